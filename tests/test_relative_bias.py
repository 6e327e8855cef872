"""Position tables of encoder-decoders are trained with exact per-example clipping (issue 13).

T5's ``relative_attention_bias`` (block 0 computes ``[1, H, q, k]``, every later block reuses it), UMT5's (a
table in every layer), LongT5's local attention (``[1, 1, H, b, 3b]``) and BART's learned positions: every
trainable parameter's per-example gradient equals the one-example-at-a-time oracle (each example alone, its
source padding and its ``-100`` target tail cut off), with and without padding, with and without gradient
checkpointing (both modes); and the clipped sum written into ``p.grad`` equals the oracle's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BartConfig, BartForConditionalGeneration, BlenderbotSmallConfig,
                          BlenderbotSmallForConditionalGeneration, LongT5Config, LongT5ForConditionalGeneration,
                          T5Config, T5ForConditionalGeneration, UMT5Config, UMT5ForConditionalGeneration)

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.relative_bias import RelativeBiasRule
from hf_ewtune.errors import UnsupportedModuleError
from hf_ewtune.losses import per_example_loss

from test_clipping_oracle import expected_clipped_sum

V, B, SRC, TGT = 48, 4, 7, 5
T5_SIZES = dict(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(**T5_SIZES))
    elif kind == "umt5":
        model = UMT5ForConditionalGeneration(UMT5Config(**T5_SIZES))
    elif kind == "longt5_local":
        model = LongT5ForConditionalGeneration(LongT5Config(**T5_SIZES, encoder_attention_type="local",
                                                            local_radius=2))
    else:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))
    model = model.double().train()
    with torch.no_grad():  # non-trivial tables (T5 initialises them with a small std)
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name or "embed_positions" in name:
                p.normal_(0, 0.5)
    return model


def batch_for(model, padded: bool, tgt: int = TGT) -> dict:
    g = torch.Generator().manual_seed(5)
    pad = model.config.pad_token_id
    ids = torch.randint(3, V, (B, SRC), generator=g)
    labels = torch.randint(3, V, (B, tgt), generator=g)
    mask = torch.ones(B, SRC, dtype=torch.long)
    if padded:  # sources of 7, 4, 6, 5 tokens, targets of 5, 3, 4, 2
        for i, (s, t) in enumerate([(7, 5), (4, 3), (6, 4), (5, 2)]):
            ids[i, s:], mask[i, s:], labels[i, t:] = pad, 0, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_loss(model, batch: dict, with_mask: bool) -> torch.Tensor:
    kw = {"attention_mask": batch["attention_mask"]} if with_mask else {}
    logits = model(input_ids=batch["input_ids"], labels=batch["labels"], **kw).logits
    return per_example_loss(logits, batch["labels"], task="token")


def oracle(model, batch: dict) -> dict[str, torch.Tensor]:
    """One backward per example, each example alone: its source unpadded, its target without the -100 tail."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(B):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
        labels = batch["labels"][i][batch["labels"][i] != -100][None]
        loss = per_example_loss(model(input_ids=ids, labels=labels).logits, labels, task="token")[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _position_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "relative_attention_bias" in n or "embed_positions" in n]


# target_len_is_batch: the decoder's [T] position ids (BART) and [T, T] buckets (T5) have T == B.
CASES = [("t5", "padded"), ("t5", "unpadded_no_mask"), ("t5", "target_len_is_batch"), ("umt5", "padded"),
         ("longt5_local", "padded"), ("bart", "padded"), ("bart", "unpadded_no_mask"), ("bart", "target_len_is_batch")]


@pytest.mark.parametrize("kind,case", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_per_example_gradients_of_every_parameter_equal_the_oracle(kind, case):
    model = tiny(kind)
    padded = case != "unpadded_no_mask"
    batch = batch_for(model, padded, tgt=B if case == "target_len_is_batch" else TGT)
    truth = oracle(model, batch)
    positions = _position_names(model)
    assert positions and all(truth[n].abs().sum() > 0 for n in positions)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    try:
        if kind != "bart":
            assert sum(isinstance(r, RelativeBiasRule) for r in engine._rules.values()) >= 2
        got = engine.per_example_gradients(batch_loss(model, batch, with_mask=padded))
        for name in truth:
            torch.testing.assert_close(got[name], truth[name], rtol=1e-6, atol=1e-10, msg=name)
        norms = engine.backward(batch_loss(model, batch, with_mask=padded))
    finally:
        engine.remove()
    true_norms = sum(v.reshape(B, -1).pow(2).sum(1) for v in truth.values()).sqrt()
    torch.testing.assert_close(norms, true_norms, rtol=1e-6, atol=1e-10)
    want = expected_clipped_sum(truth, c=0.05, style="flat")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-6, atol=1e-10, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_gradient_checkpointing_keeps_the_relative_bias_exact(kind, reentrant):
    model = tiny(kind)
    batch = batch_for(model, padded=True)
    truth = oracle(model, batch)  # without checkpointing
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    engine = ClippingEngine(model, max_grad_norm=0.05)
    try:
        got = engine.per_example_gradients(batch_loss(model, batch, with_mask=True))
        for name in truth:
            torch.testing.assert_close(got[name], truth[name], rtol=1e-6, atol=1e-10, msg=name)
        model.zero_grad(set_to_none=True)
        engine.backward(batch_loss(model, batch, with_mask=True))
        assert engine._records == []
    finally:
        engine.remove()
    want = expected_clipped_sum(truth, c=0.05, style="flat")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-6, atol=1e-10, msg=name)


def test_batch_of_query_length_examples_is_not_mistaken_for_the_batch():
    # Old main (plain embedding rule on the [q, k] bucket ids, ClippingEngine without DPSeq2SeqTrainer's refusal):
    # with B == q for the encoder and the decoder, the leading-dimension check passed and the q rows of bucket ids
    # were taken for examples: silently wrong per-example gradients.
    model = tiny("t5")
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, V, (TGT, TGT), generator=g),
             "attention_mask": torch.ones(TGT, TGT, dtype=torch.long),
             "labels": torch.randint(3, V, (TGT, TGT), generator=g)}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = []
    for i in range(TGT):
        labels = batch["labels"][i:i + 1]
        loss = per_example_loss(model(input_ids=batch["input_ids"][i:i + 1], labels=labels).logits, labels,
                                task="token")[0]
        want.append(torch.autograd.grad(loss, [params[n] for n in _position_names(model)]))
    engine = ClippingEngine(model, max_grad_norm=1.0)
    got = engine.per_example_gradients(batch_loss(model, batch, with_mask=True))
    engine.remove()
    for k, name in enumerate(_position_names(model)):
        torch.testing.assert_close(got[name], torch.stack([w[k] for w in want]), rtol=1e-6, atol=1e-10, msg=name)


def test_remove_restores_compute_bias_and_eval_output_is_unbatched():
    model = tiny("t5")
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert "compute_bias" not in attn.__dict__
    engine = ClippingEngine(model, max_grad_norm=1.0)
    assert "compute_bias" in attn.__dict__
    batch = batch_for(model, padded=True)
    with torch.no_grad():
        model.eval()
        assert attn.compute_bias(SRC, SRC).shape == (1, 2, SRC, SRC)  # eval / generation: untouched
        model.train()
    model(**batch)  # a forward leaves no batch size behind for a call outside it
    with pytest.raises(UnsupportedModuleError, match="outside its module's forward"):
        attn.compute_bias(SRC, SRC)
    engine.clear()
    clone = copy.deepcopy(model)  # a copy of a hooked model is not expanded by (nor recorded into) this engine
    clone(**batch)
    assert not any(r.module in set(clone.modules()) for r in engine._records)
    engine.clear()
    engine.remove()
    assert "compute_bias" not in attn.__dict__ and not any(k.startswith("_hf_ewtune") for k in attn.__dict__)
    loss = batch_loss(model, batch, with_mask=True).sum()  # plain training again
    loss.backward()
    assert attn.relative_attention_bias.weight.grad is not None


def test_relative_table_without_compute_bias_is_refused():
    class Encoder(torch.nn.Module):  # MPNet-style: bias looked up on [q, k] buckets, no T5 compute_bias
        def __init__(self):
            super().__init__()
            self.relative_attention_bias = torch.nn.Embedding(8, 2)
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            t = x.shape[1]
            buckets = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(0, 7)
            bias = self.relative_attention_bias(buckets).permute(2, 0, 1)  # [H, T, T]
            return self.proj(x) + bias.sum(0).mean(-1, keepdim=True)

    with pytest.raises(UnsupportedModuleError, match="relative_attention_bias.*compute_bias|requires_grad_"):
        ClippingEngine(Encoder(), max_grad_norm=1.0)
    model = Encoder()
    model.relative_attention_bias.requires_grad_(False)
    ClippingEngine(model, max_grad_norm=1.0).remove()  # frozen: fine


def test_position_table_called_with_a_shape_is_refused_at_the_first_backward():
    # BlenderbotSmall's learned positions see only the input's shape: output [T, d], shared by the batch. With
    # T == B the torch.func fallback on old main took positions for examples (silently wrong).
    torch.manual_seed(0)
    model = BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, pad_token_id=0, decoder_start_token_id=1)).double().train()
    batch = {"input_ids": torch.randint(3, V, (TGT, TGT)), "attention_mask": torch.ones(TGT, TGT, dtype=torch.long),
             "labels": torch.randint(3, V, (TGT, TGT))}  # B == T for the encoder and the decoder
    engine = ClippingEngine(model, max_grad_norm=1.0)
    with pytest.raises(UnsupportedModuleError, match="without any batched tensor input"):
        engine.per_example_gradients(batch_loss(model, batch, with_mask=True))
    engine.remove()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_user_level_units_clip_the_summed_gradient_of_each_unit(kind):
    model = tiny(kind)
    batch = batch_for(model, padded=True)
    truth = oracle(model, batch)
    units = torch.tensor([0, 1, 0, 1])
    per_unit = {n: torch.stack([v[units == u].sum(0) for u in (0, 1)]) for n, v in truth.items()}
    engine = ClippingEngine(model, max_grad_norm=0.05)
    try:
        norms = engine.backward(batch_loss(model, batch, with_mask=True), units=units)
    finally:
        engine.remove()
    torch.testing.assert_close(norms, sum(v.reshape(2, -1).pow(2).sum(1) for v in per_unit.values()).sqrt(),
                               rtol=1e-6, atol=1e-10)
    want = expected_clipped_sum(per_unit, c=0.05, style="flat")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-6, atol=1e-10, msg=name)


def test_a_second_engine_keeps_the_expansion_when_the_first_is_removed():
    model = tiny("t5")
    batch = batch_for(model, padded=True)
    truth = oracle(model, batch)
    first = ClippingEngine(model, max_grad_norm=1.0)
    second = ClippingEngine(model, max_grad_norm=1.0)
    first.remove()
    got = second.per_example_gradients(batch_loss(model, batch, with_mask=True))
    second.remove()
    for name in _position_names(model):
        torch.testing.assert_close(got[name], truth[name], rtol=1e-6, atol=1e-10, msg=name)
    assert "compute_bias" not in model.encoder.block[0].layer[0].SelfAttention.__dict__
