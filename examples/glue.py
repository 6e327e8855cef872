#!/usr/bin/env python
"""EW-Tune's GLUE experiments (SST-2, QNLI, QQP, MNLI) with DPTrainer, plus a results table.

Paper defaults (Behnia et al. 2022, star-ailab/LLM_Tune; see docs/design accountant.md §7): RoBERTa-base,
expected batch 2000, 20 epochs, target epsilon 8, delta 1e-5, clipping norm 10, learning rate 3e-4.
Differences, on purpose: EW-Tune fine-tunes with RGP rank-1 reparametrisation and fixed-size shuffled
batches; here it is LoRA (r=8 on query/value + the classifier head) with Poisson sampling (what the
accountant assumes), and the epsilon we publish is the *certified* PLD bound — the Edgeworth value
(EW-Tune's accountant) is printed beside it as an estimate. At the paper's settings the Edgeworth
calibration under-states epsilon (SST-2: 8.29 certified at the paper's sigma).

Needs a network for the GLUE data and roberta-base (``datasets.load_dataset("glue", task)``,
``evaluate.load("accuracy")`` with an offline fallback). ``--smoke`` runs the same code path on tiny
offline stand-ins (a 2-layer BERT and synthetic single-sentence / sentence-pair data) in seconds.

Examples:
    python examples/glue.py --smoke --output-dir /tmp/glue-smoke
    python examples/glue.py --tasks sst2 --output-dir runs/glue                 # GPU recommended
    python examples/glue.py --tasks sst2,qnli --accountant rdp --target-epsilon 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

# task -> (first text column, second text column or None, number of labels, evaluation split)
TASKS: dict[str, tuple[str, str | None, int, str]] = {
    "sst2": ("sentence", None, 2, "validation"),
    "qnli": ("question", "sentence", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
}
PAPER = dict(model="roberta-base", batch_size=2000, epochs=20.0, target_epsilon=8.0, target_delta=1e-5,
             max_grad_norm=10.0, learning_rate=3e-4)


def load_glue(task: str) -> Any:
    """GLUE ``task`` as a ``DatasetDict`` with ``train`` and ``test`` (= the labelled validation split)."""
    from datasets import DatasetDict, load_dataset

    raw = load_dataset("glue", task)
    return DatasetDict({"train": raw["train"], "test": raw[TASKS[task][3]]})


def synthetic_glue(task: str, *, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Any:
    """Tiny offline stand-in with the task's column names and label count (for ``--smoke`` and tests)."""
    import random

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS

    first, second, num_labels, _ = TASKS[task]
    rng = random.Random(seed)
    rows: dict[str, list] = {first: [], "label": []}
    if second:
        rows[second] = []
    for _ in range(n_train + n_test):
        i = rng.randrange(len(SAMPLE_TEXTS))
        rows[first].append(SAMPLE_TEXTS[i])
        if second is None:
            rows["label"].append(SAMPLE_LABELS[i])
            continue
        j = rng.randrange(len(SAMPLE_TEXTS))
        rows[second].append(SAMPLE_TEXTS[j])
        same = SAMPLE_LABELS[i] == SAMPLE_LABELS[j]
        if num_labels == 2:
            rows["label"].append(int(same))
        else:  # MNLI-like: 0 identical ("entailment"), 1 same polarity ("neutral"), 2 opposite ("contradiction")
            rows["label"].append(0 if i == j else (1 if same else 2))
    feats = {c: Value("string") for c in rows if c != "label"}
    feats["label"] = ClassLabel(num_classes=num_labels)
    full = Dataset.from_dict(rows, features=Features(feats))
    return DatasetDict({"train": full.select(range(n_train)), "test": full.select(range(n_train, n_train + n_test))})


def accuracy_metric() -> tuple[Callable, str]:
    """``compute_metrics`` from ``evaluate.load("accuracy")``, or the offline implementation if unavailable."""
    from hf_ewtune.recipes.metrics import accuracy_metrics

    try:
        import evaluate
        import numpy as np

        metric = evaluate.load("accuracy")
    except Exception:  # offline: the metric script lives on the Hub
        return accuracy_metrics, "hf_ewtune.recipes.metrics (offline)"

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred[0], eval_pred[1]
        return metric.compute(predictions=np.asarray(logits).argmax(-1), references=labels)

    return compute, "evaluate.load('accuracy')"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="sst2,qnli,qqp,mnli", help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--model", default=PAPER["model"])
    p.add_argument("--output-dir", default="runs/glue")
    p.add_argument("--accountant", default="edgeworth", choices=("edgeworth", "pld", "rdp"),
                   help="edgeworth = EW-Tune's estimate shown, certified PLD enforced")
    p.add_argument("--target-epsilon", type=float, default=PAPER["target_epsilon"])
    p.add_argument("--target-delta", type=float, default=PAPER["target_delta"],
                   help="the paper's 1e-5 is not below 1/N for QQP and MNLI (N > 100,000): those tasks are refused "
                        "unless you pass a smaller delta or --allow-large-delta")
    p.add_argument("--allow-large-delta", action="store_true",
                   help="accept a delta at or above 1/N (the model card then says what such a delta permits)")
    p.add_argument("--max-grad-norm", type=float, default=PAPER["max_grad_norm"])
    p.add_argument("--batch-size", type=int, default=PAPER["batch_size"], help="expected logical batch size")
    p.add_argument("--micro-batch-size", type=int, default=50)
    p.add_argument("--epochs", type=float, default=PAPER["epochs"])
    p.add_argument("--learning-rate", type=float, default=PAPER["learning_rate"])
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--non-private", action="store_true")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny offline model + synthetic data, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_task(task: str, a: argparse.Namespace, compute_metrics: Callable) -> Any:
    from hf_ewtune.recipes import LoraSettings, PrivacySettings, TextClassificationConfig, run_text_classification

    first, second, _, _ = TASKS[task]
    dataset = synthetic_glue(task, seed=a.seed) if a.smoke else load_glue(task)
    batch, micro, epochs, lr = a.batch_size, a.micro_batch_size, a.epochs, a.learning_rate
    if a.smoke:  # the paper's batch of 2000 does not fit 96 examples
        batch, micro, epochs, lr = 32, 16, min(epochs, 2.0), 3e-3
    config = TextClassificationConfig(
        output_dir=str(Path(a.output_dir) / task), model=a.model, dataset=f"glue/{task}", text_column=first,
        text_pair_column=second, label_column="label", max_length=a.max_length, epochs=epochs, batch_size=batch,
        micro_batch_size=micro, learning_rate=lr, use_lora=not a.no_lora, lora=LoraSettings(r=a.lora_r, alpha=2 * a.lora_r),
        privacy=PrivacySettings(target_epsilon=a.target_epsilon, target_delta=a.target_delta, max_grad_norm=a.max_grad_norm,
                                accountant=a.accountant, private=not a.non_private,
                                allow_large_delta=a.allow_large_delta),
        max_train_samples=a.max_train_samples, max_eval_samples=a.max_eval_samples, smoke=a.smoke, seed=a.seed,
        progress=not a.no_progress,
    )
    return run_text_classification(config=config, dataset=dataset, compute_metrics=compute_metrics)


def results_table(rows: list[tuple[str, Any]]) -> str:
    """Markdown table of the runs: accuracy, certified epsilon (and certifier), Edgeworth estimate, sigma, steps, time."""
    lines = ["| task | accuracy | certified ε (δ) | Edgeworth ε (estimate) | σ | steps | wall time |",
             "|---|---|---|---|---|---|---|"]
    certifiers = set()
    for task, r in rows:
        if r.private:
            certifiers.add(r.certified_by)
            eps = f"{r.epsilon:.3f} ({r.delta:.0e})" if r.delta else f"{r.epsilon:.3f}"
            ew = f"{r.edgeworth_epsilon:.3f}" if r.edgeworth_epsilon is not None else "—"
            sigma = f"{r.noise_multiplier:.4f}" if r.noise_multiplier is not None else "—"
        else:
            eps, ew, sigma = "∞ (non-private)", "—", "—"
        lines.append(f"| {task} | {r.metrics.get('accuracy', float('nan')):.4f} | {eps} | {ew} | {sigma} | {r.steps} | {r.wall_seconds:.0f} s |")
    if certifiers:
        lines.append("")
        lines.append("certified by: " + "; ".join(sorted(certifiers)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"glue.py: error: unknown task(s) {unknown}; choose from {list(TASKS)}", file=sys.stderr)
        return 2
    if a.smoke and a.model == PAPER["model"]:
        a.model = "tiny offline BERT"
    compute_metrics, metric_source = (accuracy_metric() if not a.smoke else (None, "hf_ewtune.recipes.metrics (offline)"))
    if compute_metrics is None:
        from hf_ewtune.recipes.metrics import accuracy_metrics as compute_metrics
    rows = []
    start = time.perf_counter()
    for task in tasks:
        print(f"\n=== {task} ({a.model}, {'non-private' if a.non_private else f'target ε = {a.target_epsilon:g}'}, accountant {a.accountant}) ===", flush=True)
        rows.append((task, run_task(task, a, compute_metrics)))
    if not all(r.main_process for _, r in rows):  # accelerate launch: rank 0 reports for the whole run
        return 0
    table = results_table(rows)
    print(f"\n== GLUE results (accuracy via {metric_source}; {time.perf_counter() - start:.0f} s in all) ==")
    print(table)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {task: {"accuracy": r.metrics.get("accuracy"), "epsilon": r.epsilon, "certified_by": r.certified_by,
                "edgeworth_epsilon": r.edgeworth_epsilon, "delta": r.delta, "noise_multiplier": r.noise_multiplier,
                "steps": r.steps, "wall_seconds": r.wall_seconds} for task, r in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
