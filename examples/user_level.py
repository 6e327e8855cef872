"""User-level vs example-level DP at the same epsilon, on the same data (issue 16).

Rotten Tomatoes critic snippets (offline, see ``hf_ewtune.data``) get SYNTHETIC authors: every author writes
several snippets (between ``--min-rows`` and ``--max-rows``, drawn uniformly; authors are assigned at random,
so they carry no signal). Two runs at the same certified epsilon:

* **example-level** DP (the unit is one snippet): ``per_device_train_batch_size`` snippets per step;
* **user-level** DP (``user_id_column="author"``, the unit is one author with ALL of their snippets; at most
  ``--max-examples-per-user`` of them per step): the batch counts authors, so it is set to the example-level
  batch divided by the cap, for a comparable number of rows per step.

Same model (the main job's: all-MiniLM-L6-v2, mean-pooled head, LoRA on the top 2 layers), same optimizer and
learning rates, same delta, same number of
epochs (a user-level epoch, round(1/q) steps, visits every author once in expectation, so all their rows up to
the cap). The table reports test accuracy, the certified epsilon, sigma, q and what each guarantee protects.
The example-level epsilon protects one snippet; an author with k snippets is then protected only at roughly
k times that epsilon (group privacy), which the user-level run does not need.

Usage::

    HF_HUB_OFFLINE=1 python examples/user_level.py --smoke     # tiny random BERT, built-in sentences (~1 min CPU)
    HF_HUB_OFFLINE=1 python examples/user_level.py             # MiniLM + Rotten Tomatoes (a GPU is advisable)

Writes ``results.json`` and ``results.md`` into ``--out-dir`` (default ``outputs/user_level``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random BERT on the built-in sentences (CI)")
    p.add_argument("--epsilon", type=float, default=3.0, help="certified target epsilon of both runs")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=256, help="example-level expected rows per step")
    p.add_argument("--min-rows", type=int, default=4, help="fewest snippets per synthetic author")
    p.add_argument("--max-rows", type=int, default=12, help="most snippets per synthetic author")
    p.add_argument("--max-examples-per-user", type=int, default=8, help="per-author cap per step (user level)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="LoRA rate (the main job's)")
    p.add_argument("--delta", type=float, default=1e-6, help="delta of both runs (the same, for a fair comparison)")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training snippets")
    p.add_argument("--out-dir", default="outputs/user_level")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_authors(n: int, *, min_rows: int, max_rows: int, seed: int) -> list[str]:
    """Random author ids for ``n`` rows: each author owns ``min_rows..max_rows`` rows, rows shuffled."""
    rng = random.Random(seed)
    authors: list[str] = []
    while len(authors) < n:
        authors += [f"author{len(set(authors))}"] * rng.randint(min_rows, max_rows)
    authors = authors[:n]
    rng.shuffle(authors)
    return authors


def load_data(args: argparse.Namespace):
    """``(train, test, tokenizer, model_factory)`` for the smoke or the real run."""
    from datasets import Dataset

    if args.smoke:
        from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS, tiny_bert, tiny_tokenizer

        tok = tiny_tokenizer()
        rng = random.Random(args.seed)
        idx = [rng.randrange(len(SAMPLE_TEXTS)) for _ in range(240)]
        raw = Dataset.from_dict({"text": [SAMPLE_TEXTS[i] for i in idx], "label": [SAMPLE_LABELS[i] for i in idx]})
        train, test = raw.select(range(200)), raw.select(range(200, 240))
        return train, test, tok, lambda: tiny_bert(vocab_size=len(tok))
    from hf_ewtune.data import load_rotten_tomatoes, minilm_path

    data = load_rotten_tomatoes(seed=args.seed)
    train, test = data["train"], data["test"]
    if args.train_size:
        train = train.select(range(min(args.train_size, len(train))))
    from hf_ewtune.recipes.heads import load_classifier
    from hf_ewtune.recipes.models import LoraSettings, apply_lora

    _, tok, _ = load_classifier(minilm_path(), num_labels=2)

    def model_factory():
        # the main job's model: mean-pooled, L2-normalised head on all-MiniLM-L6-v2, LoRA on the top 2 layers
        model, _, _ = load_classifier(minilm_path(), num_labels=2)
        return apply_lora(model, settings=LoraSettings(last_layers=2), task_type="SEQ_CLS")

    return train, test, tok, model_factory


def run(args: argparse.Namespace, *, user_level: bool, train, test, tok, model_factory) -> dict:
    import numpy as np
    from transformers import DataCollatorWithPadding

    from hf_ewtune import DPTrainer, DPTrainingArguments

    max_len = 32 if args.smoke else 64

    def encode(ds):
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_len), batched=True,
                      remove_columns=["text"])

    train_enc, test_enc = encode(train), encode(test)
    batch = max(1, args.batch_size // args.max_examples_per_user) if user_level else args.batch_size
    name = "user" if user_level else "example"
    out = Path(args.out_dir) / name
    targs = DPTrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=batch,
        per_device_eval_batch_size=64, learning_rate=args.learning_rate, save_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, use_cpu=args.smoke, seed=args.seed,
        target_epsilon=args.epsilon, target_delta=args.delta, max_grad_norm=1.0, max_physical_batch_size=64,
        user_id_column="author" if user_level else None,
        max_examples_per_user=args.max_examples_per_user if user_level else None,
        noise_seed=args.seed if args.smoke else None,
    )
    model = model_factory()
    optimizer = None
    if not args.smoke:  # the main job's optimizer: the pooled head at its own (larger) rate
        from hf_ewtune.recipes.heads import head_optimizer

        optimizer = head_optimizer(model, learning_rate=args.learning_rate, head_learning_rate=None)
    trainer = DPTrainer(model=model, args=targs, train_dataset=train_enc,
                        data_collator=DataCollatorWithPadding(tok),
                        optimizers=(optimizer, None) if optimizer is not None else (None, None))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    pred = trainer.predict(test_enc)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    report = trainer.get_privacy_spent()
    trainer.save_model()
    return {
        "privacy_unit": name, "accuracy": accuracy, "epsilon": float(report.epsilon), "delta": trainer.delta,
        "certified_by": str(report.certified_by), "noise_multiplier": trainer.noise_multiplier,
        "sample_rate": trainer.sample_rate, "steps": trainer.privacy_callback.steps,
        "per_device_train_batch_size": batch, "train_seconds": round(seconds, 1),
        "max_examples_per_user": args.max_examples_per_user if user_level else None,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.batch_size, args.epochs, args.min_rows, args.max_rows = min(args.batch_size, 16), min(args.epochs, 1.0), 2, 6
        args.max_examples_per_user = min(args.max_examples_per_user, 4)
        args.learning_rate = 5e-3
    train, test, tok, model_factory = load_data(args)
    authors = synthetic_authors(len(train), min_rows=args.min_rows, max_rows=args.max_rows, seed=args.seed)
    train = train.add_column("author", authors)
    rows = {"train_rows": len(train), "authors": len(set(authors)), "test_rows": len(test)}
    results = {"command": "python examples/user_level.py " + ("--smoke" if args.smoke else ""), **rows,
               "runs": [run(args, user_level=u, train=train, test=test, tok=tok, model_factory=model_factory)
                        for u in (False, True)]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"{rows['train_rows']} training snippets by {rows['authors']} synthetic authors; "
             f"{rows['test_rows']} test snippets.", "",
             "| privacy unit | test accuracy | certified ε (δ) | σ | q | steps | batch (per step) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        unit = "one author (all snippets)" if r["privacy_unit"] == "user" else "one snippet"
        per = f"{r['per_device_train_batch_size']} authors" if r["privacy_unit"] == "user" else \
            f"{r['per_device_train_batch_size']} snippets"
        lines.append(f"| {unit} | {r['accuracy']:.3f} | {r['epsilon']:.3g} ({r['delta']:.0e}) | "
                     f"{r['noise_multiplier']:.3g} | {r['sample_rate']:.3g} | {r['steps']} | {per} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
