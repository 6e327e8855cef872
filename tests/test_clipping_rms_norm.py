"""RMSNorm fast path: Llama-family norms get the closed-form rule only after their self-check, and match the loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.functorch_fallback import FunctorchRule
from hf_ewtune.clipping.rms_norm import RMSNormRule, is_rms_norm_candidate, passes_self_check
from tests.test_clipping_oracle import expected_clipped_sum, gpt2_batch, lm_loss, loop_grads


def tiny_llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config).to(dtype).train()
    with torch.no_grad():  # norms start at ones: give them distinct weights so errors cannot cancel
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


class ShiftedRMSNorm(nn.Module):
    """Named like an RMSNorm, but the weight also enters squared: the closed form is wrong for it."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_hat + 0.1 * self.weight.pow(2)


class GemmaStyleRMSNorm(nn.Module):
    """``(1 + weight) * x_hat`` computed in float32: the same weight gradient as Llama's."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(h))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def test_llama_norms_use_the_fast_rule_and_match_the_loop():
    model, batch = tiny_llama(), gpt2_batch(b=4)
    truth = loop_grads(model, batch, lm_loss)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(isinstance(engine._rules[m], RMSNormRule) for m in norms)
    engine.backward(lm_loss(model, batch))
    expected = expected_clipped_sum(truth, c=0.05, style="flat")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-8, msg=name)


def test_torch_rmsnorm_with_default_eps_matches_loop():
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 2)).double()
    x, y = torch.randn(5, 3, 6, dtype=torch.float64), torch.randint(0, 2, (5,))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]).mean(1), batch["y"], reduction="none")

    batch = {"x": x, "y": y}
    truth = loop_grads(model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=0.1)
    assert isinstance(engine._rules[model[1]], RMSNormRule)
    engine.backward(loss_fn(model, batch))
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_self_check_rejects_a_different_formula_and_keeps_the_fallback():
    wrong, gemma = ShiftedRMSNorm(8), GemmaStyleRMSNorm(8)
    assert is_rms_norm_candidate(wrong) and is_rms_norm_candidate(gemma)
    assert not passes_self_check(wrong)
    assert passes_self_check(gemma)
    model = nn.Sequential(nn.Linear(4, 8), wrong, nn.Linear(8, 2)).double()
    engine = ClippingEngine(model, max_grad_norm=0.1)
    assert isinstance(engine._rules[model[1]], FunctorchRule)  # exact, if slower
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    truth = loop_grads(model, {"x": x, "y": y}, loss_fn)
    engine.backward(loss_fn(model, {"x": x, "y": y}))
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    torch.testing.assert_close(model[1].weight.grad, expected["1.weight"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("module", [nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8, elementwise_affine=False)])
def test_non_rms_modules_are_not_candidates(module):
    assert not is_rms_norm_candidate(module)
