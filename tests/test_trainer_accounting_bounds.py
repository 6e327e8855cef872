"""DPTrainer: runs that cannot be accounted are refused before training; a failing accountant after the
last step cannot lose the trained weights."""

from __future__ import annotations

import logging
import os

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.privacy_state import load_privacy_state
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


@pytest.mark.parametrize(
    "privacy, match",
    [
        ({"noise_multiplier": 1e-3}, r"noise_multiplier=0\.001 is outside the supported range"),
        ({"noise_multiplier": 1e308}, r"noise_multiplier=1e\+308 is outside the supported range"),
        ({"target_epsilon": 200.0}, r"target_epsilon=200\.0 is above the supported range"),
        ({"noise_multiplier": 1.0, "target_epsilon": 200.0}, r"target_epsilon=200\.0 is above the supported range"),
    ],
)
def test_unaccountable_settings_are_refused_when_the_trainer_is_built(tmp_path, privacy, match):
    with pytest.raises(PrivacyConfigError, match=match):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                  noise_seed=0, **privacy)


def test_failing_accountant_after_training_does_not_lose_the_model(tmp_path, caplog):
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, logging_steps=1),
                        train_dataset=_data(), noise_multiplier=1.0, noise_seed=0)

    def boom(*args, **kwargs):
        raise MemoryError("Unable to allocate 38.0 GiB")

    trainer.privacy_callback.accountant.get_privacy_spent = boom
    with caplog.at_level(logging.ERROR, logger="hf_ewtune.callbacks"):
        trainer.train()  # used to raise MemoryError from the epsilon logging after the last step
    assert trainer.state.global_step == 2
    assert "could not compute the privacy spent" in caplog.text
    assert all("epsilon" not in h for h in trainer.state.log_history if "loss" in h)  # no made-up epsilon
    trainer.save_model()
    assert os.path.isfile(os.path.join(tmp_path, "model.safetensors"))
    state = load_privacy_state(str(tmp_path))
    assert state["steps"] == 2 and state["epsilon"] is None
    assert state["accountant_state"]["history"] == [[1.0, 0.25, 2]]  # `hf-ewtune report` can recompute it
