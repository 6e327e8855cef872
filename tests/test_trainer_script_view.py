"""What a script user sees: the privacy plan printed once at train() start, and a card with the guarantee on save_model."""

from __future__ import annotations

import logging

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.model_card import read_privacy_metadata
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


def test_train_prints_sigma_delta_q_steps_and_target_once_at_warning_level(tmp_path, caplog):
    """Old main logged the calibrated sigma and the default delta at INFO, which transformers' scripts never show."""
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                        target_epsilon=8.0, noise_seed=0)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_ewtune.trainer" and "noise_multiplier" in r.getMessage()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert f"sigma = {trainer.noise_multiplier:.4g}" in line and "calibrated to the target, certified" in line
    assert f"delta = {trainer.delta:.3g}" in line and f"q = {trainer.sample_rate:.4g}" in line
    assert f"{trainer.planned_steps} planned steps" in line and "target epsilon = 8" in line


@pytest.mark.parametrize("peft", [False, True])
def test_save_model_leaves_a_card_with_the_guarantee_whatever_the_model(tmp_path, peft):
    """Old main: save_model() left PEFT's card (or no card) without epsilon/delta unless create_model_card() was called."""
    model = tiny_bert(vocab_size=len(TOK))
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"]))
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data(), noise_multiplier=1.0,
                        noise_seed=0)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    meta = read_privacy_metadata(str(out))
    assert meta["epsilon"] == pytest.approx(trainer.get_privacy_spent().epsilon, rel=1e-3)
    assert meta["delta"] == pytest.approx(trainer.delta)
    assert (out / "adapter_config.json").is_file() == peft
