"""DPSFTTrainer: TRL's SFT data handling trained with exact per-example DP-SGD (tiny Llama, offline)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

from hf_ewtune.errors import PrivacyConfigError  # noqa: E402
from hf_ewtune.trl import DPSFTConfig, DPSFTTrainer  # noqa: E402
from hf_ewtune.trl.compat import checkpointing_refused  # noqa: E402
from hf_ewtune.trl.sft import SFT_UNIT, sft_per_example_loss  # noqa: E402

from trl_helpers import args_kw, chat_tokenizer, clipped_sum_oracle, tiny_llama  # noqa: E402

TOK = chat_tokenizer()
PROMPTS = ["Review: a fine film. Sentiment:", "Review: dull. Sentiment:", "Review: warm and wise, truly. Sentiment:",
           "Review: a mess. Sentiment:"]
COMPLETIONS = [" positive", " negative", " positive", " negative"]


def prompt_completion(n=16):
    return Dataset.from_dict({"prompt": [PROMPTS[i % 4] for i in range(n)],
                              "completion": [COMPLETIONS[i % 4] for i in range(n)]})


def conversations(n=16):
    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": PROMPTS[i % 4]}, {"role": "assistant", "content": COMPLETIONS[i % 4].strip()}]
        for i in range(n)]})


def trainer(tmp_path, dataset=None, *, dtype=torch.float32, **overrides):
    kw = args_kw(tmp_path, **overrides)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("noise_seed", 0)
    return DPSFTTrainer(model=tiny_llama(len(TOK), dtype=dtype), args=DPSFTConfig(**kw),
                        train_dataset=dataset if dataset is not None else prompt_completion(), processing_class=TOK)


def collated(tr, rows=4):
    ds = tr._remove_unused_columns(tr.train_dataset, description="training")
    return tr.data_collator([ds[i] for i in range(rows)])


@pytest.mark.parametrize("make_data", [prompt_completion, conversations], ids=["completion_only", "assistant_only"])
def test_per_example_update_equals_clipped_sum_of_one_at_a_time_gradients(tmp_path, make_data):
    extra = {"assistant_only_loss": True} if make_data is conversations else {}
    tr = trainer(tmp_path, make_data(), dtype=torch.float64, max_grad_norm=0.05, **extra)
    batch = collated(tr)
    model = tr.model
    model.train()
    for p in model.parameters():
        p.grad = None
    tr._engine.backward(tr.compute_per_example_loss(model, batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def one(i):  # example i alone, without padding, through plain autograd
        keep = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][keep][None], batch["labels"][i][keep][None]
        return sft_per_example_loss(model(input_ids=ids).logits, labels)[0]

    with tr._engine.suspended():
        want = clipped_sum_oracle(model, [one(i) for i in range(batch["input_ids"].shape[0])], 0.05)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)


def test_completion_only_loss_trains_the_completion_tokens_only(tmp_path):
    tr = trainer(tmp_path)
    batch = collated(tr)
    prompt_len = len(TOK(PROMPTS[0])["input_ids"])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert (labels[:prompt_len] == -100).all()
    assert (labels[prompt_len:][batch["attention_mask"][0][prompt_len:].bool()] ==
            ids[prompt_len:][batch["attention_mask"][0][prompt_len:].bool()]).all()
    # The per-example loss is the mean over those completion tokens only: changing a prompt token's logit row
    # that predicts a prompt token leaves it unchanged.
    logits = torch.randn(1, ids.shape[0], len(TOK))
    base = sft_per_example_loss(logits, labels[None])
    logits[0, 1, 5] += 10.0  # predicts token 2, inside the prompt
    assert torch.equal(sft_per_example_loss(logits, labels[None]), base)
    logits[0, prompt_len - 1, 5] += 10.0  # predicts the first completion token
    assert not torch.equal(sft_per_example_loss(logits, labels[None]), base)


def test_training_logs_sft_statistics_and_epsilon(tmp_path):
    tr = trainer(tmp_path)
    tr.train()
    first = tr.state.log_history[0]
    assert {"epsilon", "mean_token_accuracy", "entropy", "num_tokens"} <= set(first)
    assert tr.get_privacy_spent().steps == 2


@pytest.mark.parametrize("setting", ["packing", "padding_free"])
def test_packing_and_padding_free_are_refused_with_the_sft_fix(tmp_path, setting):
    with pytest.raises(PrivacyConfigError, match=r"packing=False, padding_free=False"):
        DPSFTConfig(**args_kw(tmp_path, noise_multiplier=1.0, **{setting: True}))
    plain = SFTConfig(**args_kw(tmp_path, gradient_checkpointing=False, **{setting: True}))
    with pytest.raises(PrivacyConfigError, match=rf"{setting}=True .*packing=False, padding_free=False"):
        DPSFTTrainer(model=tiny_llama(len(TOK)), args=plain, train_dataset=prompt_completion(), processing_class=TOK,
                     noise_multiplier=1.0)


def test_sftconfig_default_gradient_checkpointing_is_kept_now_that_the_engine_supports_it(tmp_path):
    plain = SFTConfig(**args_kw(tmp_path))
    assert plain.gradient_checkpointing  # TRL's default
    assert not checkpointing_refused()  # the engine clips under checkpointing (tests/test_clipping_checkpointing.py)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing=True.*", category=UserWarning)
        tr = DPSFTTrainer(model=tiny_llama(len(TOK)), args=plain, train_dataset=prompt_completion(),
                          processing_class=TOK, noise_multiplier=1.0, noise_seed=0)
    assert tr.args.gradient_checkpointing is True and plain.gradient_checkpointing is True
    tr.train()
    assert tr.get_privacy_spent().steps == 2


def test_without_checkpointing_turns_it_off_on_a_copy_when_the_engine_refuses(tmp_path, monkeypatch):
    import hf_ewtune.trl.compat as compat

    monkeypatch.setattr(compat, "checkpointing_refused", lambda: True)
    plain = SFTConfig(**args_kw(tmp_path))
    with pytest.warns(UserWarning, match="gradient_checkpointing=True"):
        copy = compat.without_checkpointing(plain, trainer_name="DPSFTTrainer")
    assert copy.gradient_checkpointing is False and plain.gradient_checkpointing is True


def test_dpsftconfig_defaults_checkpointing_off_and_accepts_it_when_asked(tmp_path):
    assert DPSFTConfig(**args_kw(tmp_path, noise_multiplier=1.0)).gradient_checkpointing is False
    assert DPSFTConfig(**args_kw(tmp_path, noise_multiplier=1.0, gradient_checkpointing=True)).gradient_checkpointing


def test_compute_loss_func_is_refused(tmp_path):
    with pytest.raises(PrivacyConfigError, match="compute_per_example_loss"):
        DPSFTTrainer(model=tiny_llama(len(TOK)), args=DPSFTConfig(**args_kw(tmp_path, noise_multiplier=1.0)),
                     train_dataset=prompt_completion(), processing_class=TOK,
                     compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean())


def test_subclass_overriding_compute_loss_or_training_step_is_refused(tmp_path):
    class Loud(DPSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    class Stepper(DPSFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs, num_items_in_batch)

    class Fine(DPSFTTrainer):  # overrides the per-example hook: its compute_loss is for evaluation only
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

        def compute_per_example_loss(self, model, inputs):
            return super().compute_per_example_loss(model, inputs) * 2.0

    cfg = DPSFTConfig(**args_kw(tmp_path, noise_multiplier=1.0))
    for cls, method in ((Loud, "compute_loss"), (Stepper, "training_step")):
        with pytest.raises(PrivacyConfigError, match=rf"overrides {method}.*compute_per_example_loss"):
            cls(model=tiny_llama(len(TOK)), args=cfg, train_dataset=prompt_completion(), processing_class=TOK)
    Fine(model=tiny_llama(len(TOK)), args=cfg, train_dataset=prompt_completion(), processing_class=TOK)


def test_saved_card_names_the_privacy_unit_and_withholds_sft_batch_statistics(tmp_path):
    tr = trainer(tmp_path)
    tr.train()
    tr.save_model()
    tr.create_model_card()
    card = open(os.path.join(tmp_path, "README.md")).read()
    meta = card.split("---")[1]
    assert "privacy_unit: " in meta and "one training example" in meta
    assert json.load(open(os.path.join(tmp_path, "_privacy_state.json")))["privacy_unit"] == SFT_UNIT
    assert "mean_token_accuracy" not in card or "withheld" in card


def test_resume_keeps_the_spent_budget(tmp_path):
    first = trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    first.train()
    spent = first.get_privacy_spent()
    second = trainer(tmp_path, save_strategy="no", max_steps=3)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = second.get_privacy_spent()
    assert resumed.steps == 3 and resumed.epsilon > spent.epsilon
