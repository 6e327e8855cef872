"""``hf-ewtune train``: the main job — DP LoRA fine-tuning of a text classifier, offline by default.

Defaults: all-MiniLM-L6-v2, LoRA r=8 (alpha 16) on query/value of the top 2 layers plus a linear classifier on the
mean-pooled sentence vector (the checkpoint's own pooling), the offline
Rotten Tomatoes sentiment data, a certified target epsilon of 3 (delta below 1/N), about 10 minutes
on 2 CPU cores. Prints the test accuracy, the certified epsilon (and what certified it) and the
Edgeworth estimate; leaves the adapter, tokenizer, privacy model card and privacy-curve plot in
OUTPUT_DIR.

Example:
    $ hf-ewtune train --output-dir runs/minilm-rt
    $ hf-ewtune train --output-dir runs/base --non-private
    $ hf-ewtune train --output-dir runs/mine --model distilbert-base-uncased --dataset glue/sst2 --target-epsilon 8
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``, generated from the recipe's dataclasses.

    Recipe and training options come from :class:`~hf_ewtune.recipes.TextClassificationConfig`, ``--lora-*`` from
    :class:`~hf_ewtune.recipes.LoraSettings` and the privacy options from :class:`~hf_ewtune.recipes.PrivacySettings`
    (whose help and value checks are those of :class:`~hf_ewtune.PrivacyArguments`).
    """
    from hf_ewtune.cli_options import add_dataclass_options
    from hf_ewtune.recipes import LoraSettings, PrivacySettings, TextClassificationConfig

    defaults = TextClassificationConfig()
    add_dataclass_options(parser, TextClassificationConfig)
    add_dataclass_options(parser, PrivacySettings, defaults=defaults.privacy)
    add_dataclass_options(parser, LoraSettings, prefix="lora-", defaults=defaults.lora)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command to ``subparsers`` (sets ``func(args) -> int``)."""
    parser = subparsers.add_parser(
        "train", help="DP LoRA fine-tuning of a text classifier (default: MiniLM on Rotten Tomatoes, epsilon 3)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace):
    """Build a :class:`~hf_ewtune.recipes.TextClassificationConfig` from parsed ``train`` options."""
    import dataclasses

    from hf_ewtune.cli_options import dataclass_from_options
    from hf_ewtune.recipes import LoraSettings, PrivacySettings, TextClassificationConfig

    config = dataclass_from_options(
        TextClassificationConfig, args, privacy=dataclass_from_options(PrivacySettings, args),
        lora=dataclass_from_options(LoraSettings, args, prefix="lora-"),
    )
    changes: dict = {}
    if config.learning_rate is None:
        changes["learning_rate"] = 1e-2 if config.use_lora else 5e-5
    if config.smoke and config.batch_size == TextClassificationConfig.batch_size:
        changes.update(batch_size=32, micro_batch_size=8)
    return dataclasses.replace(config, **changes)


def _close_process_group() -> None:
    """Under ``accelerate launch``: tear the process group down before exit (a live gloo group can abort at exit)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_train(args: argparse.Namespace) -> int:
    """Run the main job from parsed options; prints the results and returns the exit status."""
    from hf_ewtune.errors import PrivacyConfigError
    from hf_ewtune.recipes import run_text_classification

    config = config_from_args(args)
    from hf_ewtune.recipes.training import privacy_headline

    what = privacy_headline(config.privacy)  # names a target epsilon only when one is enforced
    model = "tiny offline BERT (smoke)" if config.smoke else config.model
    print(f"hf-ewtune train: {model} on {'tiny offline data (smoke)' if config.smoke else config.dataset}, "
          f"{'LoRA' if config.use_lora else 'full fine-tuning'}, {what}", flush=True)
    try:
        result = run_text_classification(config=config)
    except (PrivacyConfigError, ValueError, OSError) as exc:
        print(f"hf-ewtune train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    if not result.main_process:  # accelerate launch: rank 0 reports for the whole run
        return 0
    print()
    print("== results ==")
    for line in result.summary_lines():
        print(line)
    if result.private and config.privacy.allow_large_delta:
        print("caveat: --allow-large-delta: δ was not required to be below 1/N; a δ of at least 1/N permits releasing "
              "whole training examples (the model card says so)")
    if result.card_path:
        print(f"model card: {result.card_path}")
    if result.plot_path:
        print(f"privacy curve: {result.plot_path}")
    elif result.private:
        print("privacy curve: not written (matplotlib missing or nothing logged)")
    if result.hub_commit:
        print(f"published: {result.hub_commit}")
    elif config.push_to_hub:
        print(f"hf-ewtune train: publishing to {config.push_to_hub} failed (see the log above); the run is saved "
              f"in {result.output_dir}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hf_ewtune.commands.train ...``)."""
    parser = argparse.ArgumentParser(prog="hf-ewtune train", description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
