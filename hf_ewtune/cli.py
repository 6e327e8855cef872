"""``hf-ewtune``: command-line entry point.

Sub-commands are registered from the modules listed in :data:`COMMAND_MODULES`; each module exposes
``register(subparsers)`` and sets ``func(args) -> int`` on its parsers. A listed module that does not
exist (yet) is skipped; any other import error is raised. Heavy libraries (torch, transformers) are
only imported by the command that needs them, so ``hf-ewtune --help`` and the accounting commands
start fast.

Example:
    $ hf-ewtune calibrate --target-epsilon 3 --sample-rate 0.01 --steps 300 --delta 1e-5
    $ hf-ewtune compare
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMAND_MODULES = [
    "hf_ewtune.commands.accounting",
    "hf_ewtune.commands.card",
    "hf_ewtune.commands.train",
    "hf_ewtune.commands.audit",
    "hf_ewtune.commands.sft",
]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (naming the flag) and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _load_commands(names: Sequence[str]) -> list:
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside an existing module is a real error
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-ewtune`` parser with every available sub-command."""
    from hf_ewtune import __version__

    parser = _Parser(
        prog="hf-ewtune",
        description="Differentially private fine-tuning of Hugging Face models with certified privacy accounting.",
    )
    parser.add_argument("--version", action="version", version=f"hf-ewtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _load_commands(COMMAND_MODULES):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-ewtune`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Bad input gives exit status 2 and a one-line message naming the flag (no traceback).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError

    try:
        return int(func(args) or 0)
    except (PrivacyConfigError, PrivacyStateError) as exc:
        print(f"hf-ewtune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
