"""DPDPOTrainer: one preference record (prompt, chosen, rejected) is one privacy unit, clipped as a whole."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from hf_ewtune.errors import PrivacyConfigError  # noqa: E402
from hf_ewtune.trl import DPDPOConfig, DPDPOTrainer  # noqa: E402
from hf_ewtune.trl.dpo import DPO_UNIT, completion_logps, dpo_record_loss  # noqa: E402

from trl_helpers import args_kw, chat_tokenizer, clipped_sum_oracle, tiny_llama  # noqa: E402

TOK = chat_tokenizer()


def preferences(n=16):
    prompts = ["Review: a fine film. Sentiment:", "Review: dull and long. Sentiment:", "Review: wise. Sentiment:"]
    good, bad = [" positive", " negative", " positive"], [" negative", " positive!", " meh"]
    return Dataset.from_dict({"prompt": [prompts[i % 3] for i in range(n)], "chosen": [good[i % 3] for i in range(n)],
                              "rejected": [bad[i % 3] for i in range(n)]})


def trainer(tmp_path, *, dtype=torch.float32, **overrides):
    kw = args_kw(tmp_path, **overrides)
    kw.pop("max_length")
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("noise_seed", 0)
    policy = tiny_llama(len(TOK), dtype=dtype)
    ref = tiny_llama(len(TOK), seed=1, dtype=dtype)  # a different frozen reference: non-zero log-ratios
    return DPDPOTrainer(model=policy, ref_model=ref, args=DPDPOConfig(**kw), train_dataset=preferences(),
                        processing_class=TOK)


def test_per_record_update_equals_clipped_sum_over_both_completions(tmp_path):
    tr = trainer(tmp_path, dtype=torch.float64, max_grad_norm=0.05, beta=0.5)
    ds = tr._remove_unused_columns(tr.train_dataset, description="training")
    batch = tr.data_collator([ds[i] for i in range(4)])
    assert batch["chosen_input_ids"].shape[0] == 4 and batch["rejected_input_ids"].shape[0] == 4
    model = tr.model
    model.train()
    for p in model.parameters():
        p.grad = None
    tr._engine.backward(tr.compute_per_example_loss(model, batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def logps(m, side, i):
        keep = batch[f"{side}_attention_mask"][i].bool()
        ids = batch[f"{side}_input_ids"][i][keep][None]
        return completion_logps(m(input_ids=ids).logits, ids, batch[f"{side}_completion_mask"][i][keep][None])

    def record(i):  # record i alone, the chosen and the rejected completion through plain autograd
        with torch.no_grad():
            ref_c, ref_r = logps(tr.ref_model, "chosen", i), logps(tr.ref_model, "rejected", i)
        return dpo_record_loss(logps(model, "chosen", i) - ref_c, logps(model, "rejected", i) - ref_r,
                               loss_type="sigmoid", beta=0.5)[0]

    with tr._engine.suspended():
        want = clipped_sum_oracle(model, [record(i) for i in range(4)], 0.05)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)
    # The frozen reference model got no gradient (it is outside the accounting and never trained).
    assert all(p.grad is None for p in tr.ref_model.parameters())


def test_dpo_run_accounts_records_and_the_card_names_the_unit(tmp_path):
    tr = trainer(tmp_path)
    tr.train()
    assert tr.get_privacy_spent().steps == 2
    assert {"epsilon", "rewards/margins"} <= set(tr.state.log_history[0])
    tr.save_model()
    assert json.load(open(os.path.join(tmp_path, "_privacy_state.json")))["privacy_unit"] == DPO_UNIT
    card = open(os.path.join(tmp_path, "README.md")).read()
    assert "one preference record" in card.split("---")[1]


@pytest.mark.parametrize("setting", [{"loss_type": "aot"}, {"loss_type": ["sigmoid", "sft"]}, {"use_weighting": True},
                                     {"ld_alpha": 0.5}, {"padding_free": True}])
def test_losses_that_couple_records_are_refused(tmp_path, setting):
    with pytest.raises(PrivacyConfigError, match="DPDPOTrainer"):
        DPDPOConfig(**{**args_kw(tmp_path, noise_multiplier=1.0), **setting})


def test_subclass_overriding_compute_loss_is_refused(tmp_path):
    class Loud(DPDPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    kw = args_kw(tmp_path, noise_multiplier=1.0)
    kw.pop("max_length")
    with pytest.raises(PrivacyConfigError, match="overrides compute_loss"):
        Loud(model=tiny_llama(len(TOK)), ref_model=tiny_llama(len(TOK)), args=DPDPOConfig(**kw),
             train_dataset=preferences(), processing_class=TOK)
