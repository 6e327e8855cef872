"""ClippingEngine against the one-example-at-a-time oracle (tiny BERT, tiny GPT-2 with tied embeddings, LoRA)."""

from __future__ import annotations

import pytest
import torch

from hf_ewtune.clipping import ClippingEngine
from tests.test_clipping_oracle import expected_clipped_sum, loop_grads, make

KINDS = ["bert", "gpt2", "lora"]
_TRUTH: dict[str, dict[str, torch.Tensor]] = {}


def truth_for(kind: str, model, batch, loss_fn) -> dict[str, torch.Tensor]:
    """The loop oracle, computed once per model kind (models are rebuilt identically from a fixed seed)."""
    if kind not in _TRUTH:
        _TRUTH[kind] = loop_grads(model, batch, loss_fn)
    return _TRUTH[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_gradients_match_loop(kind):
    model, batch, loss_fn = make(kind)
    truth = truth_for(kind, model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    got = engine.per_example_gradients(loss_fn(model, batch))
    engine.remove()
    assert set(got) == set(truth)
    for n in truth:
        torch.testing.assert_close(got[n], truth[n], rtol=1e-7, atol=1e-9, msg=n)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("kind", KINDS)
def test_clipped_sum_matches_loop(kind, style):
    model, batch, loss_fn = make(kind)
    truth = truth_for(kind, model, batch, loss_fn)
    c = 0.05
    expected = expected_clipped_sum(truth, c=c, style=style)
    engine = ClippingEngine(model, max_grad_norm=c, clipping=style)
    norms = engine.backward(loss_fn(model, batch))
    engine.remove()
    b = norms.shape[0]
    true_norms = sum(v.reshape(b, -1).pow(2).sum(1) for v in truth.values()).sqrt()
    torch.testing.assert_close(norms, true_norms, rtol=1e-7, atol=1e-9)
    assert bool((true_norms > c).all()), "clipping must be active in this test"
    params = dict(model.named_parameters())
    for n, e in expected.items():
        torch.testing.assert_close(params[n].grad, e, rtol=1e-7, atol=1e-9, msg=n)
    assert engine.sensitivity == c


def test_float32_matches_loop_to_1e5():
    model, batch, loss_fn = make("gpt2", dtype=torch.float32)
    truth = loop_grads(model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    got = engine.per_example_gradients(loss_fn(model, batch))
    for n in truth:
        torch.testing.assert_close(got[n], truth[n], rtol=1e-5, atol=1e-5, msg=n)
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    engine2 = ClippingEngine(model, max_grad_norm=0.1)
    engine.remove()
    engine2.backward(loss_fn(model, batch))
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-5, msg=n)


def test_accumulates_over_two_micro_batches():
    model, batch, loss_fn = make("bert")
    first = {k: v[:2] for k, v in batch.items()}
    second = {k: v[2:] for k, v in batch.items()}
    expected = expected_clipped_sum(truth_for("bert", model, batch, loss_fn), c=0.05, style="flat")
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(loss_fn(model, first))
    engine.backward(loss_fn(model, second))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-7, atol=1e-9, msg=n)


def test_grad_never_holds_unclipped_sum():
    model, batch, loss_fn = make("gpt2")
    truth = truth_for("gpt2", model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=1e-3)
    engine.backward(loss_fn(model, batch))
    total_sq = 0.0
    for n, p in model.named_parameters():
        unclipped = truth[n].sum(0)
        if unclipped.abs().max() > 1e-6:
            assert not torch.allclose(p.grad, unclipped), n
        total_sq += p.grad.pow(2).sum()
    # B examples, each clipped to C: the sum is at most B * C.
    assert float(total_sq.sqrt()) <= batch["input_ids"].shape[0] * 1e-3 * (1 + 1e-6)


def test_frozen_parameters_get_no_grad():
    model, batch, loss_fn = make("bert")
    for n, p in model.named_parameters():
        if "embeddings" in n or "layer.0." in n:
            p.requires_grad_(False)
    truth = loop_grads(model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(loss_fn(model, batch))
    expected = expected_clipped_sum(truth, c=0.05, style="flat")
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-7, atol=1e-9, msg=n)
        else:
            assert p.grad is None, n


def test_no_grad_forward_records_nothing():
    model, batch, loss_fn = make("bert")
    engine = ClippingEngine(model, max_grad_norm=1.0)
    with torch.no_grad():
        loss_fn(model, batch)
    assert engine._records == []
    model.eval()
    loss_fn(model, batch)
    assert engine._records == []
    model.train()
    loss_fn(model, batch)
    assert len(engine._records) > 0
    engine.remove()
    assert engine._records == []
    loss_fn(model, batch)
    assert engine._records == []


def test_lora_only_adapters_and_head_trainable():
    model, batch, loss_fn = make("lora")
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(loss_fn(model, batch))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
