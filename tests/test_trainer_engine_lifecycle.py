"""The clipping engine belongs to its trainer: no global registry keeps models alive, detaching is explicit."""

import gc
import logging
import weakref

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.clipping import attached_engine
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.testing import tiny_bert
from trainer_helpers import TOK, _args, _data


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_model_and_engine_are_collected_after_del_trainer(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data(), noise_multiplier=1.0,
                        noise_seed=0)
    trainer.train()
    model_ref, engine_ref = weakref.ref(model), weakref.ref(trainer._engine)
    del trainer, model
    gc.collect()
    assert model_ref() is None and engine_ref() is None  # old main: _ENGINES' value kept the model alive


def test_hooks_leave_a_model_the_user_keeps_when_its_trainer_is_collected(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    engine_ref = weakref.ref(trainer._engine)
    assert _n_hooks(model) > 0 and attached_engine(model) is trainer._engine
    del trainer
    gc.collect()
    assert _n_hooks(model) == 0 and attached_engine(model) is None and engine_ref() is None


def test_remove_hooks_is_public_and_a_detached_trainer_refuses_to_train(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    trainer.remove_hooks()
    trainer.remove_hooks()  # idempotent
    assert _n_hooks(model) == 0 and attached_engine(model) is None
    with pytest.raises(PrivacyStateError, match="hooks were removed"):
        trainer.train()


def test_second_trainer_detaches_the_first_explicitly(tmp_path, caplog):
    model = tiny_bert(vocab_size=len(TOK))
    first = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    with caplog.at_level(logging.WARNING, logger="hf_ewtune"):
        second = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    assert "already has per-example clipping hooks" in caplog.text  # old main: silent
    assert attached_engine(model) is second._engine and not first._engine.attached
    with pytest.raises(PrivacyStateError, match="newer DPTrainer"):
        first.train()  # old main: trained without any clipping hook of its own
    second.train()
    assert second.get_privacy_spent().steps == 2
