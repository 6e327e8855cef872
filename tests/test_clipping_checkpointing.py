"""Gradient checkpointing (reentrant and non-reentrant): clipped sums equal the per-example loop oracle.

The recomputed forward must neither record twice nor clip twice, and the raw gradients that a reentrant
checkpoint's inner backward accumulates must never reach ``p.grad``.
"""

from __future__ import annotations

import pytest
import torch

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.checkpointing import check_leaks, raw_gradient_guard
from hf_ewtune.errors import UnsupportedModuleError
from hf_ewtune.testing import tiny_gpt2
from tests.test_clipping_llama import tiny_llama
from tests.test_clipping_oracle import expected_clipped_sum, gpt2_batch, lm_loss, loop_grads


def _enable(model, reentrant: bool) -> None:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


def _first_linear(model) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n)


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    return calls


def _make(kind: str):
    if kind == "llama":
        return tiny_llama()
    return tiny_gpt2().double().train()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_checkpointed_clipped_sum_matches_oracle(kind, reentrant):
    model, batch = _make(kind), gpt2_batch(b=4)
    truth = loop_grads(model, batch, lm_loss)  # without checkpointing
    model.zero_grad(set_to_none=True)
    _enable(model, reentrant)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    first = model.transformer.h[0].attn.c_attn if kind == "gpt2" else model.model.layers[0].self_attn.q_proj
    calls = _count_calls(first)
    norms = engine.backward(lm_loss(model, batch))
    assert len(calls) == 2, "the block was not recomputed: checkpointing is not active"
    expected = expected_clipped_sum(truth, c=0.05, style="flat")
    true_norms = sum(v.reshape(4, -1).pow(2).sum(1) for v in truth.values()).sqrt()
    torch.testing.assert_close(norms, true_norms, rtol=1e-6, atol=1e-10)  # not doubled by a second record
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-8, msg=name)
    assert engine._records == [], "the recomputation left records for the next step"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_gradient_accumulation_adds_clipped_sums_only(reentrant):
    """Two micro-batches: p.grad is the sum of both clipped sums (no raw gradient accumulated in between)."""
    model = tiny_llama()
    b1, b2 = gpt2_batch(b=3, seed=3), gpt2_batch(b=2, seed=4)
    exp1 = expected_clipped_sum(loop_grads(model, b1, lm_loss), c=0.05, style="flat")
    exp2 = expected_clipped_sum(loop_grads(model, b2, lm_loss), c=0.05, style="flat")
    model.zero_grad(set_to_none=True)
    _enable(model, reentrant)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(lm_loss(model, b1))
    engine.backward(lm_loss(model, b2))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, exp1[name] + exp2[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_lora_only_inside_blocks(reentrant):
    """LoRA: every trainable parameter sits inside a checkpointed block (the backward must still reach them)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=2,
                                                    lora_alpha=4, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()
    batch = gpt2_batch(b=3)
    truth = loop_grads(model, batch, lm_loss)
    model.zero_grad(set_to_none=True)
    _enable(model.base_model.model, reentrant)
    engine = ClippingEngine(model, max_grad_norm=0.01)
    engine.backward(lm_loss(model, batch))
    expected = expected_clipped_sum(truth, c=0.01, style="flat")
    assert any(v.abs().sum() > 0 for v in expected.values())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-9, msg=name)


def test_raw_gradients_are_discarded_and_unrecorded_ones_raise():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 7.0)
    with raw_gradient_guard({"w": p}) as leaked:
        (p * 3).sum().backward()  # a raw, unclipped gradient
    assert torch.equal(p.grad, torch.full((2,), 7.0)) and leaked == {"w": True}
    check_leaks(leaked, {"w"})  # recorded by the engine: fine
    with pytest.raises(UnsupportedModuleError, match=r"\['w'\]"):
        check_leaks(leaked, set())
