"""Accounting sub-commands: ``epsilon``, ``calibrate``, ``compare`` and ``plot``.

Every epsilon printed as "certified" is an upper bound from dp-accounting (PLD by default); the
Edgeworth (EW-Tune) numbers are printed as estimates.

Example:
    $ hf-ewtune epsilon --noise-multiplier 0.7865 --sample-rate 0.029696 --steps 660
    $ hf-ewtune calibrate --target-epsilon 3 --sample-rate 0.01 --steps 300 --delta 1e-5
    $ hf-ewtune compare
    $ hf-ewtune plot --output epsilon.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

from hf_ewtune.accounting.registry import accountant_class, accountant_names

# Supported ranges (kept in step with hf_ewtune.accounting._validation, which is torch-free but imports numpy
# lazily; the numbers are repeated so that building the parser stays cheap).
MAX_STEPS = 10**9
SAMPLE_RATE_MIN = 1e-9
NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX = 1e-2, 1e6
TARGET_EPSILON_MAX = 100.0
SST2 = {"noise_multiplier": 0.7865, "sample_rate": 0.029696, "steps": 660, "delta": 1e-5}


# ---------------------------------------------------------------- argparse value types (flag-specific errors)
def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def _sample_rate(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (batch size / dataset size), got {text}")
    if value < SAMPLE_RATE_MIN:
        raise argparse.ArgumentTypeError(f"must be in [{SAMPLE_RATE_MIN:g}, 1] (the supported range), got {text}")
    return value


def _delta(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), e.g. 1e-5, got {text}")
    return value


def _noise(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    if value != 0.0 and not NOISE_MULTIPLIER_MIN <= value <= NOISE_MULTIPLIER_MAX:
        raise argparse.ArgumentTypeError(
            f"must be 0 or in [{NOISE_MULTIPLIER_MIN:g}, {NOISE_MULTIPLIER_MAX:g}] (the supported range), got {text}")
    return value


def _positive(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _dataset_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of examples, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _target_epsilon(text: str) -> float:
    value = _positive(text)
    if value > TARGET_EPSILON_MAX:
        raise argparse.ArgumentTypeError(f"must be in (0, {TARGET_EPSILON_MAX:g}] (the supported range), got {text}")
    return value


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_STEPS:.0e} (the supported maximum), got {text}")
    return value


def _add_setting(parser: argparse.ArgumentParser, *, defaults: dict | None = None, noise: bool = True) -> None:
    d = defaults or {}
    req = not d
    if noise:
        parser.add_argument("--noise-multiplier", type=_noise, required=req, default=d.get("noise_multiplier"),
                            help="noise std / clipping norm (sigma)")
    parser.add_argument("--sample-rate", type=_sample_rate, required=req, default=d.get("sample_rate"),
                        help="Poisson sampling rate q = expected batch size / dataset size")
    parser.add_argument("--steps", type=_steps, required=req, default=d.get("steps"), help="number of DP-SGD steps")
    parser.add_argument("--delta", type=_delta, default=d.get("delta", 1e-5), help="target delta (default 1e-5)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling", choices=("poisson", "shuffled", "random_allocation"), default="poisson",
                        help="how batches are drawn: Poisson sampling (--accountant), shuffled fixed-size batches "
                             "(certified without amplification, replace-one adjacency; needs --dataset-size), or "
                             "random allocation / balls-in-bins (its own certified bound, round(1/q) steps per epoch)")
    parser.add_argument("--dataset-size", type=_dataset_size, default=None,
                        help="training-set size N (--sampling shuffled: batch round(q N), round(1/q) steps per epoch)")


def _accounting(args: argparse.Namespace, command: str):
    """The accountant name (Poisson) or a ShuffledAccountant; None after printing an error."""
    from hf_ewtune.accounting import accountant_for_sampling

    if args.sampling == "shuffled" and args.dataset_size is None:
        print(f"hf-ewtune {command}: error: argument --dataset-size: required with --sampling shuffled", file=sys.stderr)
        return None
    n = args.dataset_size or 1
    return accountant_for_sampling(
        args.accountant, sampling=args.sampling, num_examples=n,
        batch_size=max(1, round(args.sample_rate * n)), steps_per_epoch=max(1, round(1.0 / args.sample_rate)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``epsilon``, ``calibrate``, ``compare`` and ``plot`` to ``subparsers``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = subparsers.add_parser("epsilon", help="certified epsilon (and the Edgeworth estimate) of a DP-SGD run",
                              formatter_class=fmt)
    _add_setting(p)
    p.add_argument("--accountant", choices=accountant_names(), default="edgeworth")
    _add_sampling(p)
    p.add_argument("--json", action="store_true", help="print the privacy report as JSON (inf as \"inf\")")
    p.set_defaults(func=run_epsilon)

    p = subparsers.add_parser("calibrate", help="smallest noise multiplier whose CERTIFIED epsilon meets a target",
                              formatter_class=fmt)
    p.add_argument("--target-epsilon", type=_target_epsilon, required=True, help="privacy budget epsilon")
    _add_setting(p, noise=False, defaults=None)
    p.add_argument("--accountant", choices=accountant_names(), default="edgeworth")
    _add_sampling(p)
    p.add_argument("--no-certify", action="store_true",
                   help="reproduce EW-Tune: sigma from the Edgeworth ESTIMATE only (not a guarantee)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_calibrate)

    p = subparsers.add_parser("compare", help="one table: Edgeworth (orders 1, 2, error bound), PLD, RDP, saddle-point (SPA-CLT, "
                              "SPA-MSD, its bound), with times "
                              "(default: EW-Tune's SST-2 setting)", formatter_class=fmt)
    _add_setting(p, defaults=SST2)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser("plot", help="PNG of epsilon vs steps for each accountant (needs matplotlib)",
                              formatter_class=fmt)
    _add_setting(p, defaults=SST2)
    p.add_argument("--points", type=_steps, default=12, help="number of step counts on the curve")
    p.add_argument("--output", default="epsilon_vs_steps.png", help="PNG file to write")
    p.set_defaults(func=run_plot)


# -------------------------------------------------------------------------------------------- commands
def run_epsilon(args: argparse.Namespace) -> int:
    from hf_ewtune.accounting import make_accountant

    accounting = _accounting(args, "epsilon")
    if accounting is None:
        return 2
    acc = make_accountant(accounting)
    acc.step(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, num_steps=args.steps)
    report = acc.get_privacy_spent(delta=args.delta)
    print(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from hf_ewtune.accounting import calibrate

    accounting = _accounting(args, "calibrate")
    if accounting is None:
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibrate(target_epsilon=args.target_epsilon, delta=args.delta, sample_rate=args.sample_rate,
                           steps=args.steps, accountant=accounting, certify=not args.no_certify)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if args.no_certify and accountant_class(args.accountant).edgeworth_based:
        print(f"noise multiplier: {result.noise_multiplier:.4f}  (EW-Tune: Edgeworth ESTIMATE only, NOT a guarantee)")
        verdict = "meets" if result.certified else "EXCEEDS"
        print(f"  certified epsilon at this sigma: {result.epsilon:.4f} ({verdict} the target {args.target_epsilon:g}"
              f" at delta {args.delta:g}; {result.certified_by})")
    else:
        print(f"noise multiplier: {result.noise_multiplier:.4f}")
        print(f"  certified epsilon: {result.epsilon:.4f} <= target {args.target_epsilon:g} at delta {args.delta:g}"
              f" ({result.certified_by})")
        if args.sampling == "poisson":  # the Edgeworth expansion models Poisson sampling only
            print(f"  Edgeworth first guess: sigma_EW = {result.sigma_edgeworth:.4f} "
                  f"(the Edgeworth estimate alone would under-noise by "
                  f"{100 * (1 - result.sigma_edgeworth / result.noise_multiplier):.1f}%)")
    sampling = {"poisson": "Poisson sampling", "shuffled": "shuffled fixed-size batches (replace-one)",
                "random_allocation": "random allocation (balls-in-bins)"}[args.sampling]
    print(f"  sample rate {args.sample_rate:g}, {args.steps} steps, {sampling}; took {result.seconds:.2f} s")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from hf_ewtune.accounting.compare import compare_accountants, format_comparison

    if args.noise_multiplier == 0:
        print("hf-ewtune compare: error: argument --noise-multiplier: must be > 0 to compare", file=sys.stderr)
        return 2
    setting = dict(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, steps=args.steps,
                   delta=args.delta)
    rows = compare_accountants(**setting)
    if args.json:
        print(json.dumps({"setting": setting, "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(format_comparison(rows, setting=setting))
    return 0


def run_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hf-ewtune plot: error: matplotlib is required for plot: pip install 'hf_ewtune[plot]'", file=sys.stderr)
        return 2
    from hf_ewtune.accounting.compare import epsilon_curves

    if args.noise_multiplier == 0:
        print("hf-ewtune plot: error: argument --noise-multiplier: must be > 0 to plot", file=sys.stderr)
        return 2
    curves = epsilon_curves(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, steps=args.steps,
                            delta=args.delta, points=args.points)
    steps = curves.pop("steps")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"estimate": "--", "certified": "-"}
    for label, eps in curves.items():
        ax.plot(steps, eps, styles["estimate" if "estimate" in label else "certified"], marker="o", ms=3, label=label)
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta = {args.delta:g}")
    ax.set_title(f"sigma = {args.noise_multiplier:g}, q = {args.sample_rate:g} (Poisson)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(args.output, dpi=120)
    except OSError as exc:
        print(f"hf-ewtune plot: error: argument --output: cannot write {args.output!r}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        plt.close(fig)
    print(f"wrote {args.output}")
    return 0
