"""Resuming a checkpoint under another privacy unit, user id column or sampling is refused before any step:
the card states ONE unit and ONE sampling for the whole composed history."""

from __future__ import annotations

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


def _ds():
    ds = _data(40).add_column("author", [f"user{i % 10}" for i in range(40)])
    return ds.add_column("thread", [f"t{i % 5}" for i in range(40)])


def _trainer(out, *, max_steps, per_device=2, **kw):
    ds = _ds() if kw.get("user_id_column") else _data(40)
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(out, max_steps=max_steps, per_device_train_batch_size=per_device),
                     train_dataset=ds, noise_multiplier=1.0, noise_seed=0, **kw)


def _checkpoint(tmp_path, max_steps=1, **kw):
    first = _trainer(tmp_path / "first", max_steps=max_steps, **kw)
    first.args.save_strategy, first.args.save_steps = "steps", max_steps
    first.train()
    return str(tmp_path / "first" / f"checkpoint-{max_steps}")


@pytest.mark.parametrize("before, after, match", [
    ({}, {"privacy_unit": "1024-token block"}, r"privacy unit is 'example' but this run's privacy_unit is '1024-token block'"),
    ({"user_id_column": "author"}, {"user_id_column": "thread"}, r"user_id_column='author' .* user_id_column='thread'"),
    ({}, {"sampling": "shuffled"}, r"accounted for 'poisson' sampling .* sampling='shuffled'"),
    ({"sampling": "random_allocation"}, {}, r"accounted for 'random_allocation' sampling .* sampling='poisson'"),
])
def test_resuming_under_another_unit_or_sampling_is_refused(tmp_path, before, after, match):
    ckpt = _checkpoint(tmp_path, **before)
    resumed = _trainer(tmp_path / "second", max_steps=2, **after)
    with pytest.raises(PrivacyStateError, match=match):
        resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == 0  # refused before training


def test_a_shuffled_checkpoint_accounted_as_poisson_is_not_continued_as_certified(tmp_path):
    from hf_ewtune.resume_checks import check_resumed_sampling
    from types import SimpleNamespace

    old = SimpleNamespace(accountant="pld", sampling_assumed_by_accounting=None, poisson_sampling=False)
    with pytest.raises(PrivacyStateError, match="accounted as if Poisson-sampled"):
        check_resumed_sampling(old, accountant_name="pld", sampling="poisson")


def test_resuming_with_another_per_user_cap_is_accepted(tmp_path):
    ckpt = _checkpoint(tmp_path, user_id_column="author")
    resumed = _trainer(tmp_path / "second", max_steps=2, user_id_column="author", max_examples_per_user=2)
    resumed.train(resume_from_checkpoint=ckpt)  # each user's rows are still clipped together to C
    assert resumed.privacy_callback.steps == 2


def test_resuming_shuffled_batches_of_another_size_is_refused(tmp_path):
    # 4 steps of 2-step epochs (batch 20 of 40) are 2 epochs; composed with the resumed run's 20-step epochs
    # (batch 2) they would count as 1: the published epsilon would be too small
    ckpt = _checkpoint(tmp_path, max_steps=4, sampling="shuffled", per_device=20)
    resumed = _trainer(tmp_path / "second", max_steps=5, sampling="shuffled", per_device=2)
    with pytest.raises(PrivacyStateError, match="steps_per_epoch': 2.*steps_per_epoch': 20.*epsilon too small"):
        resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == 0
