"""The noise the optimizer adds and the sigma/q the accountant composes come from one frozen source
(issue 11, item 3): assigning them after construction raises, and every step's settings match."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import TrainerCallback

from hf_ewtune import DPTrainer
from hf_ewtune.dp_settings import DPSettings
from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from hf_ewtune.noise import DPOptimizer
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


def _trainer(tmp_path, **kw):
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, **kw), train_dataset=_data(),
                     noise_multiplier=1.3, max_grad_norm=0.5, noise_seed=0)


class _Recorder(TrainerCallback):
    """Runs after PrivacyCallback: what the optimizer used vs. what the accountant recorded, per step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        dp = optimizer.optimizer if not isinstance(optimizer, DPOptimizer) else optimizer
        used = dp.last_step_settings
        sigma, q, _ = self.trainer.privacy_callback.accountant.history[-1]
        self.rows.append((used, sigma, q, self.trainer.privacy_callback.steps))
        return control


@pytest.mark.parametrize("name", ["noise_multiplier", "sample_rate", "expected_batch_size", "delta"])
def test_assigning_a_privacy_setting_after_construction_raises(tmp_path, name):
    trainer = _trainer(tmp_path)
    before = getattr(trainer, name)
    with pytest.raises(PrivacyConfigError, match=f"{name} is read-only"):
        setattr(trainer, name, 0)
    with pytest.raises(PrivacyConfigError, match="read-only"):
        setattr(trainer.privacy_callback, "noise_multiplier" if name == "expected_batch_size" else name, 0)
    assert getattr(trainer, name) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(trainer.privacy_callback.settings, name, 0)


def test_optimizer_and_accountant_share_one_frozen_settings_object(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    recorder = _Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    dp = trainer.optimizer.optimizer if not isinstance(trainer.optimizer, DPOptimizer) else trainer.optimizer
    assert dp.settings is trainer.privacy_callback.settings
    with pytest.raises(PrivacyConfigError, match="DPOptimizer.noise_multiplier is read-only"):
        dp.noise_multiplier = 0.0
    assert [row[3] for row in recorder.rows] == [1, 2, 3]
    for used, sigma, q, _ in recorder.rows:
        assert used.noise_multiplier == sigma == 1.3 and used.sample_rate == q == trainer.sample_rate
        assert used.sensitivity == 0.5 == trainer._engine.sensitivity
        assert used.expected_batch_size == trainer.expected_batch_size == 8
    state = trainer.privacy_state()
    assert state["noise_multiplier"] == 1.3 and state["max_grad_norm"] == state["sensitivity"] == 0.5


class _SwapOptimizerSettings(TrainerCallback):
    """Simulates a drift: after step 1 the optimizer's settings are replaced by zero noise."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1:
            dp = optimizer.optimizer
            object.__setattr__(dp, "_settings", dataclasses.replace(dp.settings, noise_multiplier=0.0))
        return control


def test_a_step_with_other_noise_than_accounted_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.add_callback(_SwapOptimizerSettings())
    with pytest.raises(PrivacyStateError, match="noise_multiplier=0.0"):
        trainer.train()
    assert trainer.privacy_callback.steps == 1  # the un-noised step was never accounted as noised


def test_a_changed_clipping_norm_is_refused_before_the_step(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer._engine.max_grad_norm = 5.0  # clips at 5 while the noise is calibrated for C = 0.5
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(PrivacyStateError, match="clipping norm changed"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_dp_optimizer_takes_settings_or_numbers_not_both():
    p = torch.nn.Parameter(torch.zeros(2))
    settings = DPSettings(noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=2)
    with pytest.raises(PrivacyConfigError, match="not both"):
        DPOptimizer(torch.optim.SGD([p], lr=1.0), settings=settings, noise_multiplier=0.0)
    with pytest.raises(PrivacyConfigError, match="missing"):
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match="noise_multiplier must be finite and >= 0"):
        DPSettings(noise_multiplier=-1.0, sensitivity=1.0, expected_batch_size=2)
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), settings=settings)
    assert opt.noise_multiplier == 1.0 and opt.settings is settings
