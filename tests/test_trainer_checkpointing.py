"""DPTrainer with ``activation_checkpointing=True`` (HF's gradient checkpointing), reentrant and non-reentrant."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_ewtune import DPTrainer, DPTrainingArguments
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data, _trainable


def _train(tmp_path, **ckpt) -> dict:
    model = tiny_bert(vocab_size=len(TOK))
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="sgd",
                 learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, **ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # noise_multiplier=0: no DP (debug run)
        trainer = DPTrainer(model=model, args=args, train_dataset=_data(n=16), noise_multiplier=0.0,
                            max_grad_norm=0.05, noise_seed=3, max_physical_batch_size=3)
    before = _trainable(model)
    trainer.train()
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    return {n: p - before[n] for n, p in _trainable(model).items()}, any(m.gradient_checkpointing for m in layers)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_training_gives_the_same_updates(tmp_path, reentrant):
    """sigma = 0, same Poisson batches: updates with checkpointing equal those without (nothing clipped twice)."""
    plain, plain_on = _train(tmp_path / "plain")
    ckpt, ckpt_on = _train(tmp_path / "ckpt", activation_checkpointing=True,
                           activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ckpt_on and not plain_on
    assert any(float(d.abs().max()) > 0 for d in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_checkpointing_flag_parses(tmp_path):
    args = DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, noise_multiplier=1.0,
                               activation_checkpointing=True)
    assert args.activation_checkpointing is True
