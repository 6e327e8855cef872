"""Encoder-decoder DP-SGD: tiny T5 (relative attention bias, T5LayerNorm, shared embeddings) and BART, offline.

The position tables (T5's relative attention bias, BART's learned positions) are trained and clipped per example
(issue 13); exactness against the one-example-at-a-time oracle in every setting is in test_relative_bias.py.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (BartConfig, BartForConditionalGeneration, BlenderbotSmallConfig,
                          BlenderbotSmallForConditionalGeneration, Seq2SeqTrainingArguments, T5Config,
                          T5ForConditionalGeneration)

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.losses import per_example_loss
from hf_ewtune.seq2seq import DPSeq2SeqTrainer, broadcast_parameters, freeze_broadcast_parameters

from trl_helpers import clipped_sum_oracle

V = 64


def tiny_t5(dtype=torch.float64):
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).to(dtype)


def tiny_bart(dtype=torch.float64):
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)).to(dtype)


def pairs(n=16, pad=0):
    g = torch.Generator().manual_seed(3)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        src, tgt = 7 - (i % 3), 4 - (i % 2)  # sources of 5..7 tokens, targets of 3..4: padded differently
        ids = torch.randint(3, V, (src,), generator=g).tolist()
        rows["input_ids"].append(ids + [pad] * (7 - src))
        rows["attention_mask"].append([1] * src + [0] * (7 - src))
        rows["labels"].append(torch.randint(3, V, (tgt,), generator=g).tolist() + [-100] * (4 - tgt))
    return Dataset.from_dict(rows)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=4,
                save_strategy="no", disable_tqdm=True, logging_steps=50)
    return Seq2SeqTrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("make", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_per_example_update_equals_clipped_sum_of_one_at_a_time_gradients(tmp_path, make):
    model = make()
    assert broadcast_parameters(model) == []  # issue 13: nothing to freeze any more, the position tables train
    pad = model.config.pad_token_id
    data = pairs(pad=pad)
    tr = DPTrainer(model=model, args=args(tmp_path), train_dataset=data, noise_multiplier=1.0, max_grad_norm=0.05)
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    for p in model.parameters():
        p.grad = None
    tr._engine.backward(tr.compute_per_example_loss(model, batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def one(i):  # example i alone, source unpadded, target without its -100 tail
        keep = batch["attention_mask"][i].bool()
        labels = batch["labels"][i][batch["labels"][i] != -100][None]
        logits = model(input_ids=batch["input_ids"][i][keep][None], labels=labels).logits
        return per_example_loss(logits, labels, task="token")[0]

    with tr._engine.suspended():
        want = clipped_sum_oracle(model, [one(i) for i in range(4)], 0.05)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)
    positions = [n for n in want if "relative_attention_bias" in n or "embed_positions" in n]
    assert len(positions) == 2 and all(got[n].abs().sum() > 0 for n in positions)
    if make is tiny_t5:
        names = set(got)
        assert any("layer_norm" in n for n in names) and "shared.weight" in names


def test_seq2seq_trainer_trains_with_source_and_target_of_different_lengths(tmp_path):
    # Old main gave the decoder no inputs (labels kept out of the forward, no decoder_input_ids: ValueError) and
    # would have masked the labels [B, 4] with the ENCODER attention_mask [B, 7].
    model = tiny_t5(torch.float32)
    tr = DPSeq2SeqTrainer(model=model, args=args(tmp_path), train_dataset=pairs(), noise_multiplier=1.0, noise_seed=0)
    tr.train()
    assert tr.get_privacy_spent().steps == 2


def tiny_blenderbot_small():
    torch.manual_seed(0)
    return BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0,
        pad_token_id=0, decoder_start_token_id=1))


def test_broadcast_position_parameters_are_refused_before_training(tmp_path):
    # Issue 13: T5's relative bias and BART's learned positions now train; a learned position table called with
    # the input's SHAPE only (BlenderbotSmall, LED, ...) is still shared by the whole batch and refused.
    model = tiny_blenderbot_small()
    with pytest.raises(PrivacyConfigError, match="freeze_broadcast_parameters"):
        DPSeq2SeqTrainer(model=model, args=args(tmp_path), train_dataset=pairs(), noise_multiplier=1.0)
    frozen = freeze_broadcast_parameters(model)
    assert frozen == ["model.decoder.embed_positions.weight", "model.encoder.embed_positions.weight"]
    DPSeq2SeqTrainer(model=model, args=args(tmp_path), train_dataset=pairs(), noise_multiplier=1.0)


@pytest.mark.parametrize("make", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_seq2seq_trainer_trains_the_position_tables(tmp_path, make):
    # Old main refused T5 and BART here (reject_broadcast_parameters). sigma = 0: the update is the clipped
    # gradient only, so the tables must move.
    model = make(torch.float32)
    tables = {n: p.detach().clone() for n, p in model.named_parameters()
              if "relative_attention_bias" in n or "embed_positions" in n}
    assert len(tables) == 2
    with pytest.warns(UserWarning, match="NO differential privacy"):
        tr = DPSeq2SeqTrainer(model=model, args=args(tmp_path, learning_rate=1e-2), train_dataset=pairs(),
                              noise_multiplier=0.0, max_grad_norm=1.0, noise_seed=0)
    tr.train()
    after = dict(model.named_parameters())
    for name, before in tables.items():
        assert after[name].requires_grad and not torch.equal(after[name].detach(), before), name


def test_seq2seq_subclass_overriding_compute_loss_is_refused(tmp_path):
    class Loud(DPSeq2SeqTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    model = tiny_t5()
    freeze_broadcast_parameters(model)
    with pytest.raises(PrivacyConfigError, match="overrides compute_loss"):
        Loud(model=model, args=args(tmp_path), train_dataset=pairs(), noise_multiplier=1.0)
