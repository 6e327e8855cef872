"""User-level DP end to end (issue 16): sampling over users, whole users per micro-batch and rank, the
accountant's q and steps, the state/card/report naming the unit, and the bad-input errors before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.model_card import add_privacy_to_model_card, format_privacy_report, read_privacy_metadata
from hf_ewtune.run_plan import privacy_plan_line
from hf_ewtune.testing import tiny_bert
from hf_ewtune.user_level import UserPoissonBatchSampler, plan_users, whole_unit_chunks

from trainer_helpers import TOK, _args, _data, _trainable


def _with_users(ds: Dataset, users: list) -> Dataset:
    return ds.add_column("author", users)


def _trainer(tmp_path, ds, **kw):
    targs = {k: kw.pop(k) for k in list(kw) if k in ("max_steps", "per_device_train_batch_size",
                                                        "gradient_accumulation_steps", "learning_rate")}
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, **targs), train_dataset=ds,
                     noise_seed=0, **kw)


def test_one_row_per_user_trains_exactly_like_example_level(tmp_path):
    ds = _data(32)
    users = _with_users(ds, [f"u{i}" for i in range(32)])
    example = _trainer(tmp_path / "e", users.remove_columns("author"), noise_multiplier=0.7, learning_rate=0.1)
    user = _trainer(tmp_path / "u", users, noise_multiplier=0.7, learning_rate=0.1, user_id_column="author")
    example.train()
    user.train()
    assert user.sample_rate == example.sample_rate
    before = _trainable(tiny_bert(vocab_size=len(TOK)))
    after_e, after_u = _trainable(example.model), _trainable(user.model)
    assert any(not torch.equal(after_e[n], before[n]) for n in before)  # training did move the weights
    for name in after_e:
        assert torch.equal(after_e[name], after_u[name]), name


def test_accountant_sees_user_level_rate_and_steps(tmp_path):
    ds = _with_users(_data(40), [f"user{i % 10}" for i in range(40)])  # 10 users x 4 rows
    trainer = _trainer(tmp_path, ds, noise_multiplier=1.0, user_id_column="author", max_examples_per_user=3,
                       per_device_train_batch_size=2, max_steps=3)
    assert trainer.sample_rate == pytest.approx(2 / 10)  # users, not rows (2 / 40)
    assert trainer.expected_batch_size == 2
    trainer.train()
    state = trainer.privacy_state()
    history = trainer.privacy_callback.accountant.state_dict()
    assert trainer.privacy_callback.steps == 3
    assert state["sessions"] == [[1.0, pytest.approx(0.2)]]
    assert str(0.2) in str(history) and "0.05" not in str(history)
    assert state["privacy_unit"] == "user"
    assert (state["num_users"], state["max_examples_per_user"], state["user_id_column"]) == (10, 3, "author")
    line = privacy_plan_line(trainer)
    assert "privacy unit: user" in line and "2 of 10 users" in line and "at most 3 rows" in line
    assert "per-user clipping norm C = 1" in line


def test_card_and_report_state_the_unit(tmp_path):
    ds = _with_users(_data(40), [f"user{i % 10}" for i in range(40)])
    trainer = _trainer(tmp_path, ds, noise_multiplier=1.0, user_id_column="author", per_device_train_batch_size=2,
                       max_steps=1)
    trainer.train()
    state = trainer.privacy_state()
    add_privacy_to_model_card(tmp_path / "card", state)
    meta = read_privacy_metadata(tmp_path / "card")
    assert meta["privacy_unit"] == "user"
    assert meta["adjacency"] == "add-or-remove-one user (all of their rows)"
    assert meta["num_users"] == 10 and meta["max_examples_per_user"] == "all of a user's rows"
    text = (tmp_path / "card" / "README.md").read_text()
    assert "The privacy unit is one **user**" in text and "| users U | 10 |" in text
    assert "one training **example**" not in text
    report = format_privacy_report(state)
    assert "privacy unit: user; adjacency: add-or-remove-one user" in report and "users: 10" in report


def test_card_rounds_the_number_of_users_down_unless_asked():
    from hf_ewtune.model_card import user_level_metadata

    state = {"privacy_unit": "user", "num_users": 123456, "max_examples_per_user": None}
    assert user_level_metadata(state)["num_users"] == 123000
    assert user_level_metadata(state, exact=True)["num_users"] == 123456
    assert user_level_metadata({"privacy_unit": "example", "num_users": 5}) == {}


def test_training_step_clips_whole_users_in_one_backward(tmp_path):
    authors = [f"user{i % 5}" for i in range(40)]  # 5 users x 8 rows
    ds = _with_users(_data(40), authors)
    trainer = _trainer(tmp_path, ds, noise_multiplier=1.0, user_id_column="author", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, max_steps=2, max_physical_batch_size=10)
    seen = []
    backward = trainer._engine.backward

    def spy(losses, *, units=None):
        seen.append((losses.shape[0], None if units is None else units.tolist()))
        return backward(losses, units=units)

    trainer._engine.backward = spy
    trainer.train()
    assert seen and all(u is not None for _, u in seen)
    all_units = [u for _, units in seen for u in units]
    for _, units in seen:  # a user's 8 rows always arrive together (chunks of <= 10 rows keep users whole)
        assert all(units.count(u) == 8 for u in set(units))
    assert len(all_units) % 8 == 0


def test_sampler_deals_whole_users_to_ranks_and_micro_batches_with_the_cap():
    users = [i // 3 for i in range(30)] + [10] * 7  # 10 users x 3 rows, user 10 has 7 rows
    plan = plan_users(Dataset.from_dict({"u": users}), user_id_column="u", max_examples_per_user=4)
    samplers = [UserPoissonBatchSampler(plan, 0.5, num_micro_batches=4, rank=r, world_size=2, seed=3) for r in (0, 1)]
    per_rank = [list(s) for s in samplers]
    for step in range(samplers[0].steps_per_epoch):
        batches = [per_rank[r][2 * step + k] for r in (0, 1) for k in (0, 1)]
        owners = [{int(plan.row_user[i]) for i in b} for b in batches]
        for a in range(4):
            for b in range(a + 1, 4):
                assert not owners[a] & owners[b]  # no user in two micro-batches (or two ranks)
        rows = [i for b in batches for i in b]
        assert len(rows) == len(set(rows))
        counts = np.bincount(plan.row_user[rows], minlength=11)
        assert counts.max() <= 4 and all(c in (0, 3) for c in counts[:10]) and counts[10] in (0, 4)


def test_whole_unit_chunks_keep_units_together():
    chunks = whole_unit_chunks(6, 3, torch.tensor([4, 4, 1, 4, 2, 2]))
    assert sorted(sorted(c.tolist()) for c in chunks) == [[0, 1, 3], [2], [4, 5]] or \
        sorted(sorted(c.tolist()) for c in chunks) == [[0, 1, 3], [2, 4, 5]]
    assert all(len(c) <= 3 for c in chunks)


@pytest.mark.parametrize("users,kw,match", [
    (None, {}, r"user_id_column='author' is not a column of train_dataset"),
    (["a", None] * 16, {}, r"row 1 has no user id"),
    ([float("nan")] + [float(i) for i in range(31)], {}, r"row 0 has no user id"),
    ([["a"], ["b"]] * 16, {}, r"not hashable.*string or integer user id"),
    (["a", "b", "c"] + ["a"] * 29, {"per_device_train_batch_size": 4},
     r"expected users per step .* = 4 exceeds the number of users U=3"),
])
def test_bad_user_input_is_refused_before_training(tmp_path, users, kw, match):
    ds = _data(32) if users is None else _with_users(_data(32), users)
    with pytest.raises(PrivacyConfigError, match=match):
        _trainer(tmp_path, ds, noise_multiplier=1.0, user_id_column="author", **kw)


@pytest.mark.parametrize("kw,match", [
    ({"user_id_column": "author", "max_examples_per_user": 0}, r"max_examples_per_user must be an int >= 1"),
    ({"user_id_column": "author", "max_examples_per_user": True}, r"max_examples_per_user must be an int >= 1"),
    ({"max_examples_per_user": 2}, r"max_examples_per_user=2 needs user_id_column"),
    ({"user_id_column": ""}, r"user_id_column must be the name"),
    ({"user_id_column": "author", "privacy_unit": "16-token block"}, r"can\s+mix several users"),
])
def test_bad_user_arguments_are_refused(tmp_path, kw, match):
    from hf_ewtune import PrivacyArguments

    with pytest.raises(PrivacyConfigError, match=match):
        PrivacyArguments(noise_multiplier=1.0, **kw)


def test_resuming_an_example_level_checkpoint_at_user_level_is_refused(tmp_path):
    from hf_ewtune.errors import PrivacyStateError

    ds = _with_users(_data(40), [f"user{i % 10}" for i in range(40)])
    first = _trainer(tmp_path, ds.remove_columns("author"), noise_multiplier=1.0, max_steps=1,
                     per_device_train_batch_size=2)
    first.args.save_strategy, first.args.save_steps = "steps", 1
    first.train()
    ckpt = tmp_path / "checkpoint-1"
    assert (ckpt / "_privacy_state.json").exists()
    user = _trainer(tmp_path / "u", ds, noise_multiplier=1.0, max_steps=2, per_device_train_batch_size=2,
                    user_id_column="author")
    with pytest.raises(PrivacyStateError, match="cannot mix user-level and example-level steps"):
        user.train(resume_from_checkpoint=str(ckpt))
    assert user.privacy_callback.steps == 1  # refused before any user-level step was taken


def test_an_untagged_batch_in_user_mode_is_refused(tmp_path):
    ds = _with_users(_data(40), [f"user{i % 10}" for i in range(40)])
    trainer = _trainer(tmp_path, ds, noise_multiplier=1.0, user_id_column="author", per_device_train_batch_size=2)
    batch = {"input_ids": torch.tensor(ds[:2]["input_ids"]), "attention_mask": torch.tensor(ds[:2]["attention_mask"]),
             "labels": torch.tensor(ds[:2]["labels"])}
    with pytest.raises(PrivacyConfigError, match="this batch is untagged"):
        trainer.training_step(trainer.model, batch)
