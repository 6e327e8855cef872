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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``."""
    from hf_ewtune.recipes.text_classification import DEFAULT_DATASET, DEFAULT_MODEL

    parser.add_argument("--output-dir", default="runs/minilm-rt", help="output folder (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model: an offline name (all-MiniLM-L6-v2), a local folder or a Hub id (default: %(default)s)")
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="dataset: rotten_tomatoes_offline, glue/sst2 or a Hub id with text/label columns (default: %(default)s)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--target-epsilon", type=_positive_float, default=3.0,
                        help="certified privacy budget epsilon (default: %(default)s)")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="fixed noise multiplier sigma instead of calibrating to --target-epsilon")
    parser.add_argument("--target-delta", type=_positive_float, default=None,
                        help="delta (default: min(1e-5, 1/(10 N)) rounded down to a power of 10, always below 1/N)")
    parser.add_argument("--max-grad-norm", type=_positive_float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--accountant", default="edgeworth", choices=("edgeworth", "pld", "rdp"),
                        help="edgeworth: EW-Tune estimate shown, certified PLD bound enforced (default)")
    parser.add_argument("--epochs", type=_positive_float, default=None, help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="expected logical batch size")
    parser.add_argument("--micro-batch-size", type=_positive_int, default=32,
                        help="physical batch size; gradient accumulation = batch-size / micro-batch-size")
    parser.add_argument("--learning-rate", type=_positive_float, default=None, help="AdamW learning rate (default: 1e-2 LoRA, 5e-5 full)")
    parser.add_argument("--head-learning-rate", type=_positive_float, default=None,
                        help="learning rate of the classification head (default: 5e-2 for a pooled head, else --learning-rate)")
    parser.add_argument("--pooling", default="auto", choices=("auto", "model", "mean", "cls"),
                        help="classifier head: auto = the pooling a sentence-transformers checkpoint declares (mean "
                             "for all-MiniLM-L6-v2), else the model's own head (default: %(default)s)")
    parser.add_argument("--max-length", type=_positive_int, default=64, help="truncation length in tokens")
    parser.add_argument("--max-train-samples", type=_positive_int, default=None, help="subsample the training set")
    parser.add_argument("--max-eval-samples", type=_positive_int, default=None, help="subsample the test set")
    parser.add_argument("--no-lora", action="store_true", help="fine-tune every weight instead of LoRA adapters")
    parser.add_argument("--lora-r", type=_positive_int, default=8)
    parser.add_argument("--lora-last-layers", type=_non_negative_int, default=2,
                        help="adapt only the top N transformer layers; 0 = all (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=_positive_int, default=16)
    parser.add_argument("--lora-target", default=None, help="comma-separated module names for LoRA (default: guessed)")
    parser.add_argument("--non-private", action="store_true",
                        help="baseline: plain transformers.Trainer with the same settings, no privacy")
    parser.add_argument("--save-steps", type=_positive_int, default=None,
                        help="write a checkpoint (with the privacy spent so far) every N optimizer steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --output-dir; its spent privacy counts")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                        help="upload the finished run (model, tokenizer, privacy card, plot) to this Hub repo")
    parser.add_argument("--smoke", action="store_true", help="tiny offline model and data, a few seconds (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


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
    from hf_ewtune.recipes import LoraSettings, PrivacySettings, TextClassificationConfig

    lr = args.learning_rate or (5e-5 if args.no_lora else 1e-2)
    epochs = args.epochs or 2.0
    batch, micro = args.batch_size, args.micro_batch_size
    if args.smoke and args.batch_size == 256:
        batch, micro = 32, 8
    return TextClassificationConfig(
        output_dir=args.output_dir, model=args.model, dataset=args.dataset, text_column=args.text_column,
        text_pair_column=args.text_pair_column, label_column=args.label_column, max_length=args.max_length,
        epochs=epochs, batch_size=batch, micro_batch_size=micro, learning_rate=lr, use_lora=not args.no_lora,
        head_learning_rate=args.head_learning_rate, pooling=args.pooling,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, last_layers=args.lora_last_layers or None,
                          target_modules=args.lora_target.split(",") if args.lora_target else None),
        privacy=PrivacySettings(
            target_epsilon=args.target_epsilon, noise_multiplier=args.noise_multiplier, target_delta=args.target_delta,
            max_grad_norm=args.max_grad_norm, accountant=args.accountant, private=not args.non_private,
        ),
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, smoke=args.smoke,
        seed=args.seed, progress=not args.no_progress, push_to_hub=args.push_to_hub,
        save_steps=args.save_steps, resume=args.resume,
    )


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
    what = "non-private baseline" if args.non_private else f"DP (target ε = {args.target_epsilon:g}, certified)"
    model = "tiny offline BERT (smoke)" if args.smoke else config.model
    print(f"hf-ewtune train: {model} on {'tiny offline data (smoke)' if args.smoke else config.dataset}, "
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
    if result.card_path:
        print(f"model card: {result.card_path}")
    if result.plot_path:
        print(f"privacy curve: {result.plot_path}")
    elif result.private:
        print("privacy curve: not written (matplotlib missing or nothing logged)")
    if result.hub_commit:
        print(f"published: {result.hub_commit}")
    elif args.push_to_hub:
        print(f"hf-ewtune train: publishing to {args.push_to_hub} failed (see the log above); the run is saved "
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
