"""A fresh DPTrainer run refuses an output_dir that holds another run's checkpoints (before training)."""

from __future__ import annotations

import shutil

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.privacy_state import load_privacy_state
from hf_ewtune.testing import tiny_bert
from tests.trainer_helpers import TOK, _args, _data


def _trainer(out, max_steps=2):
    args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=1)
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data(n=32),
                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_fresh_run_into_a_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    _trainer(tmp_path).train()
    before = load_privacy_state(str(tmp_path / "checkpoint-2"))
    second = _trainer(tmp_path, max_steps=3)
    with pytest.raises(PrivacyConfigError, match=r"already holds checkpoints of another DP run.*resume_from_checkpoint"):
        second.train()
    assert second.privacy_callback.steps == 0 and second.state.global_step == 0  # refused before any step
    assert not (tmp_path / "checkpoint-3").exists()
    assert load_privacy_state(str(tmp_path / "checkpoint-2")) == before  # the first run's state is untouched


def test_resuming_from_a_checkpoint_elsewhere_into_a_folder_with_checkpoints_is_refused(tmp_path):
    _trainer(tmp_path / "a").train()
    _trainer(tmp_path / "b").train()
    with pytest.raises(PrivacyConfigError, match="already holds"):
        _trainer(tmp_path / "b", max_steps=3).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


def test_resuming_and_continuing_the_same_run_still_work(tmp_path):
    first = _trainer(tmp_path / "again")
    first.train()
    first.train()  # a second train() call on the same trainer keeps composing (over its own checkpoints)
    assert first.privacy_callback.steps == 4
    _trainer(tmp_path / "run").train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")  # interrupted after step 1
    resumed = _trainer(tmp_path / "run", max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3 and resumed.privacy_callback.steps == 3


def test_other_files_in_output_dir_are_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "checkpoint-final-copy").mkdir()  # not a Trainer checkpoint name
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    assert trainer.privacy_callback.steps == 1
