"""Edited or stale privacy states are refused on resume AND by ``hf-ewtune report`` / ``card`` (issue 11, item 2).

One real run writes checkpoint-2 and checkpoint-4; each case copies checkpoint-4, tampers with its
``_privacy_state.json`` and checks that resuming from it raises PrivacyStateError before any step, and that
neither ``report`` nor ``card`` publishes an epsilon from it (exit status 2, no card written).
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.commands.card import main
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.privacy_state import PRIVACY_STATE_NAME
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
DATA = tiny_classification_dataset(TOK, n=32)


def _trainer(out):
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=4, per_device_train_batch_size=8,
        save_strategy="steps", save_steps=2, logging_steps=100, disable_tqdm=True,
    )
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=DATA,
                     noise_multiplier=1.0, target_delta=1e-5, noise_seed=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _trainer(out).train()
    assert (out / "checkpoint-2" / PRIVACY_STATE_NAME).is_file()
    assert (out / "checkpoint-4" / PRIVACY_STATE_NAME).is_file()
    return out


def _history(state):
    return state["accountant_state"]["history"]


def _lower_steps(s):
    _history(s)[0][2] = 2


def _lower_steps_everywhere(s):
    _history(s)[0][2] = 2
    s["steps"] = 2
    s["global_step"] = 2


def _raise_sigma(s):
    _history(s)[0][0] = 2.0


def _lower_q(s):
    _history(s)[0][1] = 0.1


def _empty_history(s):
    s["accountant_state"]["history"] = []


def _fractional_history_count(s):
    _history(s)[0][2] = 4.7  # the old loader truncated this to 4


def _boolean_history_count(s):
    s["accountant_state"]["history"] = [[1.0, 0.25, True]] * 4  # each True was read as 1 step


def _fractional_steps(s):
    s["steps"] = 4.5


def _boolean_steps(s):
    s["accountant_state"]["history"] = [[1.0, 0.25, 1]]
    s["steps"] = True
    s["global_step"] = True


TAMPERINGS = {
    "steps lowered": (_lower_steps, "says steps: 4"),
    "steps lowered everywhere": (_lower_steps_everywhere, "trainer_state.json"),
    "sigma raised": (_raise_sigma, "never used"),
    "q lowered": (_lower_q, "never used"),
    "empty history": (_empty_history, "holds 0 steps"),
    "fractional history count": (_fractional_history_count, "fractional"),
    "boolean history count": (_boolean_history_count, "boolean"),
    "fractional steps": (_fractional_steps, "'steps' must be a non-negative integer"),
    "boolean steps": (_boolean_steps, "must be a non-negative integer"),
}


def _tampered(run_dir, tmp_path, name):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(run_dir / "checkpoint-4", ckpt)
    path = ckpt / PRIVACY_STATE_NAME
    if name == "older checkpoint copied":
        shutil.copy(run_dir / "checkpoint-2" / PRIVACY_STATE_NAME, path)
    else:
        state = json.loads(path.read_text())
        TAMPERINGS[name][0](state)
        path.write_text(json.dumps(state))
    return ckpt


CASES = [*TAMPERINGS, "older checkpoint copied"]


def _match(name):
    return "global_step 2" if name == "older checkpoint copied" else TAMPERINGS[name][1]


@pytest.mark.parametrize("name", CASES)
def test_tampered_state_is_refused_on_resume(run_dir, tmp_path, name):
    ckpt = _tampered(run_dir, tmp_path, name)
    trainer = _trainer(tmp_path / "out")
    with pytest.raises(PrivacyStateError, match=_match(name)):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.privacy_callback.steps == 0 and trainer.state.global_step == 0
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("name", CASES)
def test_tampered_state_is_refused_by_report_and_card(run_dir, tmp_path, name, capsys):
    ckpt = _tampered(run_dir, tmp_path, name)
    assert main(["report", str(ckpt)]) == 2
    assert main(["report", "--json", str(ckpt)]) == 2
    assert main(["card", str(ckpt)]) == 2
    out, err = capsys.readouterr()
    assert "epsilon" not in out and err.count("hf-ewtune: error:") == 3 and PRIVACY_STATE_NAME in err
    assert not (ckpt / "README.md").exists()


def test_untouched_checkpoint_still_reports_and_resumes(run_dir, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(run_dir / "checkpoint-4", ckpt)
    assert main(["report", str(ckpt)]) == 0
    assert "steps 4" in capsys.readouterr().out
    trainer = _trainer(tmp_path / "out")
    state = json.loads((ckpt / PRIVACY_STATE_NAME).read_text())
    assert state["sessions"] == [[1.0, 0.25]] and state["global_step"] == 4
    trainer.privacy_callback.load_state(state)
    assert trainer.privacy_callback.accountant.history == [(1.0, 0.25, 4)]
