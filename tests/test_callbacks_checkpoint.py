"""Privacy state in checkpoints; resume restores the accountant; a checkpoint without it is refused."""

from __future__ import annotations

import json
import os

import pytest
from transformers import TrainerCallback, TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.privacy_state import PRIVACY_STATE_NAME, load_privacy_state
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
DATA = tiny_classification_dataset(TOK, n=32)


class _Interrupt(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True
        return control


def _trainer(out, *, callbacks=None, **privacy):
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=4, per_device_train_batch_size=8,
        save_strategy="steps", save_steps=2, logging_steps=100, disable_tqdm=True,
    )
    privacy = {"noise_multiplier": 1.0, "target_delta": 1e-5, **privacy}
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=DATA, callbacks=callbacks,
                     **privacy)


def test_interrupted_and_resumed_run_spends_the_same_privacy(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()

    first = _trainer(tmp_path / "resumed", callbacks=[_Interrupt(2)])
    first.train()
    assert first.state.global_step == 2
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    state = load_privacy_state(str(ckpt))
    assert state["steps"] == 2 and state["accountant_state"]["history"] == [[1.0, 0.25, 2]]

    second = _trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 4
    assert second.privacy_callback.accountant.history == full.privacy_callback.accountant.history == [(1.0, 0.25, 4)]
    assert second.get_privacy_spent().epsilon == pytest.approx(full.get_privacy_spent().epsilon)
    # The final checkpoint carries the whole history, not just the resumed part.
    assert load_privacy_state(str(tmp_path / "resumed" / "checkpoint-4"))["steps"] == 4


def test_checkpoint_without_privacy_state_is_refused(tmp_path):
    first = _trainer(tmp_path, callbacks=[_Interrupt(2)])
    first.train()
    ckpt = tmp_path / "checkpoint-2"
    os.remove(ckpt / PRIVACY_STATE_NAME)
    second = _trainer(tmp_path)
    with pytest.raises(PrivacyStateError, match="_privacy_state.json"):
        second.train(resume_from_checkpoint=str(ckpt))
    with pytest.raises(PrivacyStateError):
        second.train(resume_from_checkpoint=True)  # the last checkpoint lacks it too


def test_privacy_state_contents_and_save_model(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[_Interrupt(2)], max_grad_norm=0.5, clipping="flat", noise_seed=7)
    trainer.train()
    trainer.save_model()
    with open(tmp_path / PRIVACY_STATE_NAME) as fh:
        state = json.load(fh)
    for key in ("accountant_state", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm", "clipping",
                "sample_rate", "expected_batch_size", "poisson_sampling", "steps", "epochs", "world_size",
                "calibration", "accountant", "library_version", "stopped_early", "epsilon", "epsilon_edgeworth"):
        assert key in state, key
    assert state["max_grad_norm"] == 0.5 and state["expected_batch_size"] == 8 and state["world_size"] == 1
    assert state["steps"] == 2 and state["poisson_sampling"] is True and state["accountant"] == "edgeworth"
    text = json.dumps(state).lower()
    assert "rng" not in text and "generator" not in text and "seed\":" not in text.replace("noise_seed", "")
    assert os.path.isfile(tmp_path / "checkpoint-2" / PRIVACY_STATE_NAME)
    trainer.create_model_card(model_name="tiny-dp")
    from hf_ewtune.model_card import read_privacy_metadata

    meta = read_privacy_metadata(str(tmp_path))
    assert meta["epsilon"] == pytest.approx(trainer.get_privacy_spent().epsilon, rel=1e-3)
