"""Regenerate ``model_cards/example/`` (README.md + _privacy_state.json): the card of a real (tiny) LoRA ``DPTrainer`` run.

The model is the offline tiny BERT from ``hf_ewtune.testing`` (not a useful classifier), but the privacy
settings are those of the default recipe's scale: N = 11,476 examples, expected batch 256 (q ≈ 0.0223),
2 epochs, target ε = 3 at δ = 1e-5, noise calibrated by DPTrainer and certified by PLD.

    python model_cards/make_example.py        # 1-4 minutes on 2 CPU cores, fully offline
    hf-ewtune card model_cards/example        # re-render its privacy block only (no training)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

    tok = tiny_tokenizer()
    data = tiny_classification_dataset(tok, n=11476)
    model = get_peft_model(tiny_bert(vocab_size=len(tok)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiny-bert-dp-lora"
        args = TrainingArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=256,
                                 learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no",
                                 logging_steps=10, disable_tqdm=True)
        trainer = DPTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                            target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
        trainer.train()
        trainer.save_model()
        trainer.create_model_card(model_name="tiny-bert-dp-lora")
        target = Path(__file__).resolve().parent / "example"
        target.mkdir(exist_ok=True)
        for name in ("README.md", "_privacy_state.json"):
            shutil.copy(out / name, target / name)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
