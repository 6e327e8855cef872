"""``hf-ewtune sft``: DP supervised fine-tuning (TRL SFT) of a chat model with LoRA, offline by default.

Defaults: SmolLM2-135M-Instruct from the offline GGUF, LoRA, an instruction task built from the offline Rotten
Tomatoes sentences ("Review: ... Sentiment:" -> the label word, completion-only loss), target certified epsilon 8,
scored by greedy-generation accuracy on held-out test prompts. --dataset trains on a Hub chat dataset by name
instead (needs a network; scored by held-out loss), --user-id-column makes a user the privacy unit, --smoke
runs a tiny random Llama in seconds. Needs the TRL extra: pip install "hf_ewtune[trl]". Leaves the adapter,
the privacy model card and results.json in OUTPUT_DIR.

Example:
    $ hf-ewtune sft --smoke --output-dir /tmp/sft-smoke
    $ hf-ewtune sft --output-dir runs/sft-dp
    $ hf-ewtune sft --output-dir runs/sft-nodp --non-private
    $ hf-ewtune sft --dataset HuggingFaceH4/no_robots --model HuggingFaceTB/SmolLM2-135M-Instruct --target-epsilon 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sft`` options to ``parser``, generated from the recipe's dataclasses.

    Recipe options come from :class:`~hf_ewtune.recipes.sft.SFTRecipeConfig`, ``--lora-*`` from
    :class:`~hf_ewtune.recipes.LoraSettings` and the privacy options from :class:`~hf_ewtune.recipes.PrivacySettings`.
    """
    from hf_ewtune.cli_options import add_dataclass_options
    from hf_ewtune.recipes import LoraSettings, PrivacySettings
    from hf_ewtune.recipes.sft import SFTRecipeConfig

    defaults = SFTRecipeConfig()
    add_dataclass_options(parser, SFTRecipeConfig)
    add_dataclass_options(parser, PrivacySettings, defaults=defaults.privacy)
    add_dataclass_options(parser, LoraSettings, prefix="lora-", defaults=defaults.lora)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sft`` sub-command to ``subparsers`` (sets ``func(args) -> int``)."""
    parser = subparsers.add_parser(
        "sft", help="DP SFT (TRL) of a chat model with LoRA (default: SmolLM2-135M, instruction sentiment, epsilon 8)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_sft_command)


def config_from_args(args: argparse.Namespace):
    """Build a :class:`~hf_ewtune.recipes.sft.SFTRecipeConfig` from parsed ``sft`` options."""
    from hf_ewtune.cli_options import dataclass_from_options
    from hf_ewtune.recipes import LoraSettings, PrivacySettings
    from hf_ewtune.recipes.sft import SFTRecipeConfig

    config = dataclass_from_options(
        SFTRecipeConfig, args, privacy=dataclass_from_options(PrivacySettings, args),
        lora=dataclass_from_options(LoraSettings, args, prefix="lora-"),
    )
    if config.smoke and config.batch_size == SFTRecipeConfig.batch_size:  # small batches for the tiny data
        config = dataclasses.replace(config, batch_size=16, micro_batch_size=8)
    return config


def run_sft_command(args: argparse.Namespace) -> int:
    """Run DP SFT from parsed options; prints the results and returns the exit status."""
    from hf_ewtune.errors import PrivacyConfigError

    config = config_from_args(args)
    try:
        from hf_ewtune.recipes.sft import run_sft, summary_line

        import hf_ewtune.trl  # noqa: F401  (a clear ImportError when the TRL extra is missing)

        hf_ewtune.trl.require_trl()
    except ImportError as exc:
        print(f"hf-ewtune sft: error: {exc}", file=sys.stderr)
        return 2
    from hf_ewtune.recipes.training import privacy_headline

    what = privacy_headline(config.privacy)  # names a target epsilon only when one is enforced
    model = "tiny offline Llama (smoke)" if config.smoke else config.model
    data = config.dataset or ("built-in sentences (smoke)" if config.smoke else "Rotten Tomatoes instructions (offline)")
    print(f"hf-ewtune sft: {model} on {data}, {'LoRA' if config.use_lora else 'full fine-tuning'}, {what}", flush=True)
    try:
        result = run_sft(config=config)
    except (PrivacyConfigError, ValueError, OSError) as exc:
        print(f"hf-ewtune sft: error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(result))
    print(f"model card and results.json: {config.output_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hf_ewtune.commands.sft ...``; ``examples/sft.py`` calls it too)."""
    parser = argparse.ArgumentParser(prog="hf-ewtune sft", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_sft_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
