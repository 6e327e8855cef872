"""User-level DP with the TRL trainers (issue 16 item 5): ``user_id_column`` makes a user (all of their SFT
examples, or all of their preference records) the privacy unit of DPSFTTrainer and DPDPOTrainer."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from hf_ewtune.errors import PrivacyConfigError  # noqa: E402
from hf_ewtune.model_card import read_privacy_metadata  # noqa: E402
from hf_ewtune.trl import DPDPOConfig, DPDPOTrainer, DPSFTConfig, DPSFTTrainer  # noqa: E402
from hf_ewtune.trl.dpo import completion_logps, dpo_record_loss  # noqa: E402
from hf_ewtune.trl.sft import sft_per_example_loss  # noqa: E402
from hf_ewtune.user_level import UNITS_KEY  # noqa: E402

from trl_helpers import args_kw, chat_tokenizer, clipped_sum_oracle, tiny_llama  # noqa: E402

TOK = chat_tokenizer()
PROMPTS = ["Review: a fine film. Sentiment:", "Review: dull. Sentiment:", "Review: warm and wise, truly. Sentiment:",
           "Review: a mess. Sentiment:"]
COMPLETIONS = [" positive", " negative", " positive", " negative"]
# Users of the first 6 rows: "ann" has three rows (not adjacent), "bob" one, "cy" two.
USERS_6 = ["ann", "bob", "ann", "cy", "ann", "cy"]


def sft_data(users):
    n = len(users)
    return Dataset.from_dict({"prompt": [PROMPTS[i % 4] for i in range(n)],
                              "completion": [COMPLETIONS[i % 4] for i in range(n)], "author": list(users)})


def chat_data(users):
    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": PROMPTS[i % 4]}, {"role": "assistant", "content": COMPLETIONS[i % 4].strip()}]
        for i in range(len(users))], "author": list(users)})


def dpo_data(users):
    good, bad = [" positive", " negative", " positive"], [" negative", " positive!", " meh"]
    n = len(users)
    return Dataset.from_dict({"prompt": [PROMPTS[i % 3] for i in range(n)], "chosen": [good[i % 3] for i in range(n)],
                              "rejected": [bad[i % 3] for i in range(n)], "author": list(users)})


def sft_trainer(tmp_path, dataset, *, dtype=torch.float32, **overrides):
    kw = args_kw(tmp_path, **overrides)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("noise_seed", 0)
    return DPSFTTrainer(model=tiny_llama(len(TOK), dtype=dtype), args=DPSFTConfig(**kw), train_dataset=dataset,
                        processing_class=TOK)


def dpo_trainer(tmp_path, dataset, *, dtype=torch.float32, **overrides):
    kw = args_kw(tmp_path, **overrides)
    kw.pop("max_length")
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("noise_seed", 0)
    return DPDPOTrainer(model=tiny_llama(len(TOK), dtype=dtype), ref_model=tiny_llama(len(TOK), seed=1, dtype=dtype),
                        args=DPDPOConfig(**kw), train_dataset=dataset, processing_class=TOK)


def tagged_batch(tr, rows):
    """The first ``rows`` rows as DPTrainer's user sampler hands them to ``training_step`` (tagged with users)."""
    ds = tr._remove_unused_columns(tr.train_dataset, description="training")
    batch = dict(tr.data_collator([ds[i] for i in range(rows)]))
    batch[UNITS_KEY] = torch.as_tensor(tr.user_plan.row_user[:rows], dtype=torch.long)
    return batch


def clipped_update(tr, batch):
    """The clipped (un-noised) sum DPTrainer.training_step leaves in ``p.grad``."""
    model = tr.model
    for p in model.parameters():
        p.grad = None
    tr.training_step(model, batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def per_user(losses_by_row, users):
    """One loss per user (in order of first appearance): the sum of that user's rows' one-at-a-time losses."""
    order = list(dict.fromkeys(users))
    return [sum(loss for loss, u in zip(losses_by_row, users) if u == user) for user in order]


@pytest.mark.parametrize(("make_data", "physical"), [(sft_data, None), (sft_data, 2), (chat_data, None)],
                         ids=["completion_only", "completion_only_chunks_keep_users_whole", "assistant_only"])
def test_sft_per_user_update_equals_clipped_sum_of_each_users_one_at_a_time_gradients(tmp_path, make_data, physical):
    extra = {"assistant_only_loss": True} if make_data is chat_data else {}
    tr = sft_trainer(tmp_path, make_data(USERS_6 + ["dee", "eve"]), dtype=torch.float64, max_grad_norm=0.05,
                     user_id_column="author", per_device_train_batch_size=2, max_physical_batch_size=physical,
                     max_length=96, **extra)
    assert tr.train_dataset["author"] == USERS_6 + ["dee", "eve"]  # the id column survives TRL's preparation
    assert tr.user_plan.num_users == 5
    batch = tagged_batch(tr, 6)
    assert batch[UNITS_KEY].tolist() == [0, 1, 0, 2, 0, 2]
    got = clipped_update(tr, batch)
    model = tr.model

    def one(i):  # row i alone, without padding, through plain autograd
        keep = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][keep][None], batch["labels"][i][keep][None]
        return sft_per_example_loss(model(input_ids=ids).logits, labels)[0]

    with tr._engine.suspended():
        want = clipped_sum_oracle(model, per_user([one(i) for i in range(6)], USERS_6), 0.05)
        rows = clipped_sum_oracle(model, [one(i) for i in range(6)], 0.05)  # example-level clipping differs
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)
    assert any(not torch.allclose(got[n], rows[n], rtol=1e-4, atol=1e-7) for n in want)


def test_dpo_per_user_update_equals_clipped_sum_over_all_of_a_users_records(tmp_path):
    tr = dpo_trainer(tmp_path, dpo_data(USERS_6 + ["dee", "eve"]), dtype=torch.float64, max_grad_norm=0.05,
                     beta=0.5, user_id_column="author", per_device_train_batch_size=2)
    batch = tagged_batch(tr, 6)
    assert batch["chosen_input_ids"].shape[0] == 6 and batch[UNITS_KEY].tolist() == [0, 1, 0, 2, 0, 2]
    got = clipped_update(tr, batch)
    model = tr.model

    def logps(m, side, i):
        keep = batch[f"{side}_attention_mask"][i].bool()
        ids = batch[f"{side}_input_ids"][i][keep][None]
        return completion_logps(m(input_ids=ids).logits, ids, batch[f"{side}_completion_mask"][i][keep][None])

    def record(i):  # record i alone: its chosen and rejected completions through plain autograd
        with torch.no_grad():
            ref_c, ref_r = logps(tr.ref_model, "chosen", i), logps(tr.ref_model, "rejected", i)
        return dpo_record_loss(logps(model, "chosen", i) - ref_c, logps(model, "rejected", i) - ref_r,
                               loss_type="sigmoid", beta=0.5)[0]

    with tr._engine.suspended():
        want = clipped_sum_oracle(model, per_user([record(i) for i in range(6)], USERS_6), 0.05)
        rows = clipped_sum_oracle(model, [record(i) for i in range(6)], 0.05)  # record-level clipping differs
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)
    assert any(not torch.allclose(got[n], rows[n], rtol=1e-4, atol=1e-7) for n in want)
    assert all(p.grad is None for p in tr.ref_model.parameters())


def test_sft_one_row_per_user_trains_exactly_like_example_level(tmp_path):
    users = [f"u{i}" for i in range(12)]
    example = sft_trainer(tmp_path / "e", sft_data(users).remove_columns("author"), learning_rate=0.05,
                          noise_multiplier=0.7)
    user = sft_trainer(tmp_path / "u", sft_data(users), learning_rate=0.05, noise_multiplier=0.7,
                       user_id_column="author")
    assert user.sample_rate == example.sample_rate
    example.train()
    user.train()
    before = dict(tiny_llama(len(TOK)).named_parameters())
    moved = False
    for (name, p_e), (_, p_u) in zip(example.model.named_parameters(), user.model.named_parameters()):
        assert torch.equal(p_e, p_u), name
        moved = moved or not torch.equal(p_e, before[name])
    assert moved  # training did change the weights
    assert user.privacy_state()["privacy_unit"] == "user" and example.privacy_state()["privacy_unit"] != "user"


def test_sft_user_run_samples_users_and_the_card_names_the_unit(tmp_path):
    users = [f"user{i % 5}" for i in range(20)]  # 5 users x 4 rows
    tr = sft_trainer(tmp_path, chat_data(users), user_id_column="author", max_examples_per_user=2,
                     per_device_train_batch_size=2)
    assert "author" in tr.train_dataset.column_names  # kept through TRL's ChatML / tokenize / label maps
    assert tr.sample_rate == pytest.approx(2 / 5)  # users, not rows (2 / 20)
    tr.train()
    assert tr.get_privacy_spent().steps == 2
    tr.save_model()
    state = json.load(open(os.path.join(tmp_path, "_privacy_state.json")))
    assert state["privacy_unit"] == "user" and state["sessions"] == [[1.0, pytest.approx(0.4)]]
    assert (state["num_users"], state["max_examples_per_user"], state["user_id_column"]) == (5, 2, "author")
    meta = read_privacy_metadata(tmp_path)
    assert meta["privacy_unit"] == "user" and meta["adjacency"] == "add-or-remove-one user (all of their rows)"
    assert "The privacy unit is one **user**" in open(os.path.join(tmp_path, "README.md")).read()


def test_dpo_user_run_names_the_unit(tmp_path):
    tr = dpo_trainer(tmp_path, dpo_data([f"user{i % 4}" for i in range(12)]), user_id_column="author",
                     per_device_train_batch_size=2, max_steps=1)
    assert tr.sample_rate == pytest.approx(2 / 4)
    tr.train()
    tr.save_model()
    state = json.load(open(os.path.join(tmp_path, "_privacy_state.json")))
    assert state["privacy_unit"] == "user" and state["num_users"] == 4
    assert read_privacy_metadata(tmp_path)["privacy_unit"] == "user"


@pytest.mark.parametrize(("users", "kw", "match"), [
    (["a", None, "b", "c"], {}, r"user_id_column='author': row 1 has no user id"),
    (["a", "b", "c", "d"], {"user_id_column": "writer"}, r"user_id_column='writer' is not a column"),
    (["a", "a", "b", "b"], {"per_device_train_batch_size": 3}, r"exceeds the number of users U=2"),
])
def test_bad_user_input_is_refused_before_training(tmp_path, users, kw, match):
    kw = {"user_id_column": "author", **kw}
    with pytest.raises(PrivacyConfigError, match=match):
        sft_trainer(tmp_path, sft_data(users), **kw)


def test_a_user_id_column_that_trl_consumes_is_refused_naming_trl(tmp_path):
    # ShareGPT-style "conversations" are converted to ChatML "messages" by TRL, which drops the column.
    convs = [[{"from": "human", "value": PROMPTS[i % 4]}, {"from": "gpt", "value": COMPLETIONS[i % 4].strip()}]
             for i in range(4)]
    data = Dataset.from_dict({"conversations": convs, "author": ["a", "b", "a", "b"]})
    with pytest.raises(PrivacyConfigError, match=r"user_id_column='conversations' .*TRL's\) dataset preparation "
                                                 r"consumed it"):
        sft_trainer(tmp_path, data, user_id_column="conversations", per_device_train_batch_size=1)
