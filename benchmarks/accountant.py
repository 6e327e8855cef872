#!/usr/bin/env python
"""Accountant speed: time per epsilon query and per noise calibration, with the ratio to PLD.

Per query (identical steps, delta = 1e-5), each method timed ``--repeats`` times, ROUND-ROBIN (one
query of every method per round, so CPU-speed drift hits all methods alike); the table shows medians:

* ``EW1 cold``   Edgeworth order 1, cumulant cache cleared first (quadrature + root finding).
* ``EW1 warm``   Edgeworth order 1 from cached cumulants (what a training loop pays per log step).
* ``EW2 warm``   Edgeworth order 2 from cached cumulants.
* ``EW bound``   the explicit uniform error bound of the order-1 expansion and its epsilon interval.
* ``PLD 1e-4``   dp-accounting PLD, pessimistic, add-or-remove-one, value discretization 1e-4 (the
                 certified number every report publishes).
* ``PLD 1e-3``   the same at 1e-3 (still an upper bound; used inside the calibration search).
* ``RDP``        dp-accounting RDP, default orders.

Per calibration (target epsilon -> smallest certified sigma within 0.5%):

* ``EW only``          sigma from the Edgeworth estimate alone (EW-Tune; NOT certified).
* ``certified (EW+PLD)`` ``hf_ewtune.accounting.calibrate``: EW first guess, PLD 1e-3 search, PLD 1e-4 check.
* ``RDP``              ``calibrate(accountant="rdp")``.
* ``naive PLD 1e-4``   plain geometric bisection on PLD 1e-4 over [0.3, 20] to 0.5% (what one would do
                       without the first guess and the coarse search).

Per optimizer step (``--per-step``): what ``PrivacyCallback`` costs a training loop, amortised over runs of
100 / 1,000 / 10,000 steps of the main job's setting with a target epsilon: stepping the accountant and the
budget check every step (no epsilon is computed there: the certified step budget is precomputed), plus one
certified epsilon at the end (what the final log pays), divided by the number of steps.

Usage:
    python benchmarks/accountant.py            # default settings, 3 repeats
    python benchmarks/accountant.py --per-step # amortised accounting cost per optimizer step
    python benchmarks/accountant.py --quick    # 1 repeat, fewer settings
    python benchmarks/accountant.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable

from hf_ewtune.accounting import calibrate
from hf_ewtune.accounting.certified import dp_accounting_version, pld_epsilon, rdp_epsilon
from hf_ewtune.accounting.cumulants import step_cumulants
from hf_ewtune.accounting.edgeworth import epsilon_estimate, sum_cumulants
from hf_ewtune.accounting.edgeworth_report import edgeworth_error_bound

DELTA = 1e-5
QUERY_SETTINGS = [
    ("q=0.01 sigma=1 m=1000", 1.0, 0.01, 1000),
    ("q=0.01 sigma=1 m=10000", 1.0, 0.01, 10000),
    ("SST-2 (EW-Tune) m=660", 0.7865, 0.029696, 660),
]
CALIBRATION_SETTINGS = [
    ("generic eps=3 (q=0.01, 300 steps)", 3.0, 0.01, 300),
    ("generic eps=1 (q=0.01, 300 steps)", 1.0, 0.01, 300),
    ("SST-2 eps=8 (q=0.0297, 660 steps)", 8.0, 0.029696, 660),
]


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def query_methods(sigma: float, q: float, m: int) -> dict[str, Callable[[], float]]:
    h = [(sigma, q, m)]

    def ew1_cold() -> float:
        step_cumulants.cache_clear()
        return epsilon_estimate(DELTA, sum_cumulants(h), order=1)

    return {
        "EW1 cold": ew1_cold,
        "EW1 warm": lambda: epsilon_estimate(DELTA, sum_cumulants(h), order=1),
        "EW2 warm": lambda: epsilon_estimate(DELTA, sum_cumulants(h), order=2),
        "EW bound": lambda: edgeworth_error_bound(tuple(h), DELTA)["epsilon_upper"],
        "PLD 1e-4": lambda: pld_epsilon(h, DELTA),
        "PLD 1e-3": lambda: pld_epsilon(h, DELTA, value_discretization_interval=1e-3),
        "RDP": lambda: rdp_epsilon(h, DELTA),
    }


def naive_pld_bisection(target: float, q: float, steps: int) -> float:
    lo, hi = 0.3, 20.0
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if pld_epsilon([(mid, q, steps)], DELTA) <= target else (mid, hi)
    return hi


def calibration_methods(target: float, q: float, steps: int) -> dict[str, Callable[[], float]]:
    import warnings

    def ew_only() -> float:
        step_cumulants.cache_clear()
        from hf_ewtune.accounting import edgeworth_sigma

        return edgeworth_sigma(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)

    def certified() -> float:
        step_cumulants.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return calibrate(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps).noise_multiplier

    return {
        "EW only (not certified)": ew_only,
        "certified (EW+PLD)": certified,
        "RDP": lambda: calibrate(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
                                 accountant="rdp").noise_multiplier,
        "naive PLD 1e-4": lambda: naive_pld_bisection(target, q, steps),
    }


def run_round_robin(methods: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in methods}
    values: dict[str, float] = {}
    names = list(methods)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t, v = _timed(methods[name])
            times[name].append(t)
            values[name] = v
    return {k: {"seconds": statistics.median(times[k]), "value": values[k]} for k in methods}


def _fmt_time(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _table(title: str, results: dict[str, dict[str, float]], ref: str, value_name: str) -> str:
    lines = [f"### {title}", "", f"| method | {value_name} | time | time / {ref} |", "|---|---|---|---|"]
    ref_t = results[ref]["seconds"]
    for name, r in results.items():
        v = r["value"]
        v_txt = "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.4f}"
        lines.append(f"| {name} | {v_txt} | {_fmt_time(r['seconds'])} | {r['seconds'] / ref_t:.3g} |")
    return "\n".join(lines)


def per_step_cost(steps: int, *, sigma: float = 0.8405, q: float = 256 / 11477, delta: float = 1e-6) -> dict:
    """Seconds per optimizer step that ``PrivacyCallback`` adds over a run of ``steps`` steps (see the docstring)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_ewtune.accounting import make_accountant
    from hf_ewtune.callbacks import PrivacyCallback

    from hf_ewtune.dp_settings import DPSettings

    settings = DPSettings(noise_multiplier=sigma, sample_rate=q, expected_batch_size=256, max_grad_norm=1.0,
                          sensitivity=1.0, delta=delta)
    callback = PrivacyCallback(accountant=make_accountant("edgeworth"), accountant_name="edgeworth",
                               settings=settings, target_epsilon=100.0, budget_steps=steps + 1)
    args = TrainingArguments(output_dir="/tmp/hf_ewtune_bench", report_to="none", save_strategy="no", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    start = time.perf_counter()
    for i in range(steps):
        state.global_step = i + 1
        callback.on_step_end(args, state, control)
    stepping = time.perf_counter() - start
    logs: dict = {}
    callback.on_log(args, state, control, logs=logs)
    total = time.perf_counter() - start
    return {"steps": steps, "stepping_ms_per_step": 1e3 * stepping / steps, "final_epsilon_s": total - stepping,
            "amortised_ms_per_step": 1e3 * total / steps, "epsilon": logs.get("epsilon"),
            "segments": len(callback.accountant.history)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, first setting of each kind only")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--per-step", action="store_true", help="only the amortised cost per optimizer step")
    args = parser.parse_args(argv)
    if args.per_step:
        rows = [per_step_cost(n) for n in (100, 1_000, 10_000)]
        print("| steps | accountant step + budget check, ms/step | final certified epsilon, s | amortised ms/step |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['steps']} | {r['stepping_ms_per_step']:.4f} | {r['final_epsilon_s']:.2f} | "
                  f"{r['amortised_ms_per_step']:.2f} |")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    repeats = 1 if args.quick else args.repeats
    qs = QUERY_SETTINGS[:1] if args.quick else QUERY_SETTINGS
    cs = CALIBRATION_SETTINGS[:1] if args.quick else CALIBRATION_SETTINGS
    print(f"# Accountant benchmark (dp-accounting {dp_accounting_version()}, {platform.machine()}, "
          f"{platform.python_version()}, median of {repeats}, delta = {DELTA:g})\n")
    out: dict[str, dict] = {"query": {}, "calibration": {}}
    for label, sigma, q, m in qs:
        res = run_round_robin(query_methods(sigma, q, m), repeats)
        out["query"][label] = res
        print(_table(f"Per query: {label}", res, "PLD 1e-4", "epsilon"), "\n", flush=True)
    if not args.no_calibration:
        for label, target, q, steps in cs:
            res = run_round_robin(calibration_methods(target, q, steps), repeats)
            out["calibration"][label] = res
            print(_table(f"Per calibration: {label}", res, "naive PLD 1e-4", "sigma"), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
