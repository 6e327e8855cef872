"""DPTrainer on tiny models: LoRA (peft), bf16 autocast, causal LM with tied embeddings, empty Poisson batches."""

from __future__ import annotations

import math

import torch

from hf_ewtune import DPTrainer
from hf_ewtune.testing import tiny_bert, tiny_gpt2, tiny_tokenizer

from trainer_helpers import TOK, _args, _data, _trainable


def test_lora_run_trains_and_lora_weights_change(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_bert(vocab_size=len(TOK)),
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0),
    )
    before = _trainable(model)
    assert any("lora_B" in n for n in before)
    trainer = DPTrainer(model=model, args=_args(tmp_path, learning_rate=1e-2), train_dataset=_data(),
                        noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=1)
    trainer.train()
    after = _trainable(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert len(changed) == len(before)  # noise reaches every trainable tensor
    assert trainer.get_privacy_spent().steps == 2


def test_bf16_autocast_run(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    before = _trainable(model)
    trainer = DPTrainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=_data(),
                        noise_multiplier=1.0, noise_seed=2)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    after = _trainable(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_causal_lm_run_with_tied_embeddings(tmp_path):
    from datasets import Dataset

    tok = tiny_tokenizer(kind="bpe")
    texts = ["a gripping film", "the plot is thin", "warm, funny and wise", "a tedious mess"] * 4
    enc = tok(texts, padding="max_length", truncation=True, max_length=24)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    ds = Dataset.from_dict({**enc, "labels": labels})
    model = tiny_gpt2(vocab_size=len(tok))
    before = _trainable(model)
    trainer = DPTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=ds,
                        noise_multiplier=1.0, noise_seed=3)
    trainer.train()
    after = _trainable(model)
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert trainer.get_privacy_spent().steps == 2


def test_empty_logical_batches_still_step_and_account(tmp_path):
    """q = 2/32 split into GA=2 micro-batches: many micro-batches (and some logical batches) are empty; every
    step still gives a (noise-only) update and an accountant step, and mixed accumulations do not break HF."""
    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=8),
                        train_dataset=_data(n=32), noise_multiplier=1.0, noise_seed=4)
    seen = []
    original = trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        from hf_ewtune.sampling import is_empty_batch

        seen.append(is_empty_batch(inputs))
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    trainer.train()
    assert len(seen) == 16 and any(seen) and not all(seen)
    assert any(a != b for a, b in zip(seen[0::2], seen[1::2]))  # an accumulation mixing empty and non-empty
    assert trainer.privacy_callback.steps == 8 and trainer.state.global_step == 8
