"""Budget enforcement: calibrated target-only runs end within the target; fixed noise + target stops early."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.accounting import make_accountant
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
DELTA = 1e-5


def _args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=8,
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def test_target_epsilon_only_run_ends_within_target_and_logs_epsilon(tmp_path):
    target = 4.0
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path),
                        train_dataset=tiny_classification_dataset(TOK, n=32), target_epsilon=target,
                        target_delta=DELTA, noise_seed=0)
    assert trainer.planned_steps == 3 and trainer.sample_rate == 0.25
    trainer.train()
    report = trainer.get_privacy_spent()
    assert report.steps == 3 and trainer.state.global_step == 3
    assert report.epsilon <= target
    assert report.epsilon > 0.95 * target  # calibrated, not wastefully over-noised
    step_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(step_logs) == 3
    assert all("epsilon" in h and "epsilon_edgeworth" in h for h in step_logs)
    eps = [h["epsilon"] for h in step_logs]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(report.epsilon)
    assert "grad_norm" not in step_logs[0]  # the un-noised gradient norm is never logged
    calib = trainer.privacy_state()["calibration"]
    assert calib["certified"] and calib["noise_multiplier"] == pytest.approx(trainer.noise_multiplier)


def test_fixed_noise_and_small_target_stop_early_over_epochs(tmp_path, caplog):
    sigma, q = 1.0, 0.5
    acc = make_accountant("pld")
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=3)
    target = acc.get_epsilon(DELTA) * 1.001  # affords exactly 3 steps
    # 16 examples, batch 8: q = 0.5, 2 steps per epoch; 4 epochs planned = 8 steps.
    args = _args(tmp_path, max_steps=-1, num_train_epochs=4, logging_steps=100)
    with caplog.at_level(logging.WARNING):
        trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args,
                            train_dataset=tiny_classification_dataset(TOK, n=16), noise_multiplier=sigma,
                            target_epsilon=target, target_delta=DELTA, noise_seed=1)
        assert trainer.planned_steps == 8 and trainer.privacy_callback.budget_steps == 3
        trainer.train()
    assert trainer.state.global_step == 3  # stopped inside the second epoch
    report = trainer.get_privacy_spent()
    assert report.steps == 3 and report.epsilon <= target
    assert any("Privacy budget reached" in r.getMessage() for r in caplog.records)
    assert trainer.privacy_state()["stopped_early"] is True
    assert trainer.state.log_history[-1]["epsilon"] == pytest.approx(report.epsilon)


def test_epoch_based_run_takes_round_one_over_q_steps_per_epoch(tmp_path):
    # 16 examples, expected batch 4 x GA 2 = 8: q = 0.5, 2 steps (of 2 micro-batches each) per epoch.
    args = _args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, logging_steps=100)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args,
                        train_dataset=tiny_classification_dataset(TOK, n=16), noise_multiplier=2.0, noise_seed=3)
    assert trainer.steps_per_epoch == 2 and trainer.planned_steps == 4
    assert len(trainer.get_train_dataloader()) == 4  # micro-batches per epoch = steps x GA
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.state.epoch == pytest.approx(2.0)
    assert trainer.get_privacy_spent().steps == 4
