"""``hf-ewtune audit``: measure a lower bound on epsilon next to the certified one, in one training run.

Trains the same DP job as ``hf-ewtune train`` (same flags) once more, with canaries (each included with
probability 1/2), and reports the certified epsilon (upper bound) beside the audited epsilon (a lower bound
at --confidence; Steinke, Nasr & Jagielski 2023). Exit status 3 when the lower bound exceeds the certified
epsilon: the guarantee is false. The canaried model is never saved; only OUTPUT_DIR/audit_report.json is.

Example:
    $ hf-ewtune audit --smoke
    $ hf-ewtune audit --target-epsilon 3 --canaries 1000 --kind gradient --output-dir runs/audit
    $ hf-ewtune audit --model distilbert-base-uncased --dataset glue/sst2 --kind input
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

EXIT_VIOLATION = 3
# ``train`` flags that make no sense for an audit run (nothing is saved, resumed or published).
_REFUSED = {"push_to_hub": "--push-to-hub", "resume": "--resume", "save_steps": "--save-steps",
            "non_private": "--non-private"}


def _confidence(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), e.g. 0.95, got {text}")
    return value


def _canaries(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text}")
    return value


def _multiple(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (a canary's gradient norm is at least C), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options plus the audit's own."""
    from hf_ewtune.commands.train import add_arguments as add_train_arguments

    add_train_arguments(parser)
    parser.set_defaults(output_dir="runs/audit")
    group = parser.add_argument_group("audit")
    group.add_argument("--kind", default="gradient", choices=("gradient", "input"),
                       help="gradient: white-box Dirac gradient canaries (tests clipping, noise, sampling); "
                            "input: mislabelled test-split examples scored by loss (black-box) (default: %(default)s)")
    group.add_argument("--canaries", type=_canaries, default=1000, help="number of canaries m (default: %(default)s)")
    group.add_argument("--confidence", type=_confidence, default=0.95,
                       help="confidence of the lower bound (default: %(default)s)")
    group.add_argument("--gradient-multiple", type=_multiple, default=10.0,
                       help="gradient canaries' gradient norm in units of --max-grad-norm (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` sub-command to ``subparsers`` (sets ``func(args) -> int``)."""
    parser = subparsers.add_parser(
        "audit", help="one-run privacy audit: an empirical lower bound on epsilon beside the certified one",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_audit_command)


def run_audit_command(args: argparse.Namespace) -> int:
    """Run the audit from parsed options; prints the report, writes ``audit_report.json``; returns the exit status."""
    from hf_ewtune.audit.recipe import audit_text_classification
    from hf_ewtune.audit.processes import is_main_process
    from hf_ewtune.audit.run import command_line
    from hf_ewtune.commands.train import _close_process_group, config_from_args
    from hf_ewtune.errors import PrivacyConfigError

    for attr, flag in _REFUSED.items():
        if getattr(args, attr, None):
            print(f"hf-ewtune audit: error: {flag} is not used by an audit (the canaried model is never saved, "
                  "resumed or published); drop it.", file=sys.stderr)
            return 2
    config = config_from_args(args)
    model = "tiny offline BERT (smoke)" if args.smoke else config.model
    from hf_ewtune.recipes.training import privacy_headline

    print(f"hf-ewtune audit: {args.canaries} {args.kind} canaries, {model}, {privacy_headline(config.privacy)}",
          flush=True)
    try:
        report = audit_text_classification(config=config, kind=args.kind, num_canaries=args.canaries,
                                           confidence=args.confidence, gradient_multiple=args.gradient_multiple,
                                           command=command_line())
        main = is_main_process()  # under accelerate launch rank 0 alone prints and writes the report
    except (PrivacyConfigError, ValueError, OSError) as exc:
        print(f"hf-ewtune audit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    if not main:
        return EXIT_VIOLATION if report.violation else 0
    path = report.write_json(Path(config.output_dir) / "audit_report.json")
    print()
    print("== audit ==")
    for line in report.summary_lines():
        print(line)
    print(f"report: {path}")
    return EXIT_VIOLATION if report.violation else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hf_ewtune.commands.audit ...``)."""
    parser = argparse.ArgumentParser(prog="hf-ewtune audit", description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    return run_audit_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
