"""``hf-ewtune card OUTPUT_DIR`` and ``hf-ewtune report OUTPUT_DIR``.

``card`` re-renders the privacy statement of ``OUTPUT_DIR/README.md`` from the saved privacy state
(``_privacy_state.json``); ``report`` prints the guarantee: the certified ε, δ, what certified it, and the
Edgeworth estimate labelled as an estimate. A missing privacy state exits with status 2.

Example:
    $ hf-ewtune report runs/minilm-dp
    $ hf-ewtune card runs/minilm-dp
"""

from __future__ import annotations

import argparse
import json
import sys

from hf_ewtune.errors import PrivacyStateError

EXIT_NO_STATE = 2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="training output folder (or checkpoint folder) holding _privacy_state.json")
    parser.add_argument("--include-dataset-size", action="store_true",
                        help="also publish the dataset size N and the expected batch size (which reveals N); "
                             "off by default because N is sensitive under add/remove-one adjacency")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``card`` and ``report`` sub-commands to ``subparsers`` (each sets ``func(args) -> int``)."""
    card = subparsers.add_parser(
        "card", help="write or refresh the privacy statement in OUTPUT_DIR/README.md from the saved privacy state",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    _add_common(card)
    card.set_defaults(func=run_card)

    report = subparsers.add_parser(
        "report", help="print the certified privacy guarantee of a saved run (and the Edgeworth estimate)")
    _add_common(report)
    report.add_argument("--json", action="store_true", help="print the privacy metadata block as JSON")
    report.set_defaults(func=run_report)


def _fail(exc: Exception) -> int:
    print(f"hf-ewtune: error: {exc}", file=sys.stderr)
    return EXIT_NO_STATE


def run_card(args: argparse.Namespace) -> int:
    """Re-render ``args.output_dir/README.md``'s privacy metadata and section; returns the exit status."""
    from hf_ewtune.model_card import CERTIFIED, add_privacy_to_model_card, load_state, read_privacy_metadata

    try:
        state = load_state(args.output_dir)
        add_privacy_to_model_card(args.output_dir, state, include_dataset_size=args.include_dataset_size)
        meta = read_privacy_metadata(args.output_dir)
    except PrivacyStateError as exc:
        return _fail(exc)
    what = "certified epsilon" if meta["epsilon_is"] == CERTIFIED else f"epsilon ({meta['epsilon_is']})"
    print(f"wrote the privacy statement to {args.output_dir}/README.md: {what} = {meta['epsilon']} "
          f"at delta = {meta['delta']:.3g} (certified by: {meta['certified_by']})")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Print the guarantee of the run saved in ``args.output_dir``; returns the exit status."""
    from hf_ewtune.model_card import build_privacy_metadata, format_privacy_report, load_state

    try:
        state = load_state(args.output_dir)
        if getattr(args, "json", False):
            text = json.dumps(build_privacy_metadata(state, include_dataset_size=args.include_dataset_size), indent=2)
        else:
            text = format_privacy_report(state, include_dataset_size=args.include_dataset_size)
    except PrivacyStateError as exc:
        return _fail(exc)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hf_ewtune.commands.card report DIR``), used until ``hf_ewtune.cli``
    lists this module."""
    parser = argparse.ArgumentParser(prog="hf-ewtune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
