"""Llama-family models (RMSNorm, grouped-query attention, tied embeddings): per-example gradients match the loop.

RMSNorm goes through the torch.func fallback (a closed form was measured no faster: benchmarks/llama.py).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.functorch_fallback import FunctorchRule
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


def test_full_llama_matches_the_loop():
    model, batch = tiny_llama(), gpt2_batch(b=4)
    truth = loop_grads(model, batch, lm_loss)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(isinstance(engine._rules[m], FunctorchRule) for m in norms)
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
    assert isinstance(engine._rules[model[1]], FunctorchRule)
    engine.backward(loss_fn(model, batch))
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-6, atol=1e-9, msg=name)
