"""Per-user clipping in one backward (issue 16): the update equals the clipped sum of each user's summed
one-example-at-a-time gradients (the oracle), for BERT, GPT-2 (tied embeddings), LoRA and every clipping style."""

from __future__ import annotations

import pytest
import torch

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.groups import UnitLayout
from hf_ewtune.errors import PrivacyConfigError

from test_clipping_oracle import bert_batch, cls_loss, expected_clipped_sum, gpt2_batch, lm_loss, loop_grads, lora_bert
from hf_ewtune.testing import tiny_bert, tiny_gpt2

# Users of the rows: unit 5 has three rows (not adjacent), unit 2 one row, unit 9 two rows.
UNITS_6 = torch.tensor([5, 2, 5, 9, 5, 9])


def _model(kind: str):
    if kind == "bert":
        return tiny_bert().double().train(), bert_batch(b=6), cls_loss
    if kind == "gpt2":
        return tiny_gpt2().double().train(), gpt2_batch(b=6), lm_loss
    return lora_bert(), bert_batch(b=6), cls_loss


def _per_user(per_ex: dict[str, torch.Tensor], units: torch.Tensor) -> dict[str, torch.Tensor]:
    ids, inv = torch.unique(units, return_inverse=True)
    return {n: torch.zeros(len(ids), *g.shape[1:], dtype=g.dtype).index_add_(0, inv, g) for n, g in per_ex.items()}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "lora"])
@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_per_user_update_equals_clipped_sum_of_user_gradients(kind, style):
    model, batch, loss_fn = _model(kind)
    oracle = expected_clipped_sum(_per_user(loop_grads(model, batch, loss_fn), UNITS_6), c=0.05, style=style)
    engine = ClippingEngine(model, max_grad_norm=0.05, clipping=style)
    model.zero_grad(set_to_none=True)
    norms = engine.backward(loss_fn(model, batch), units=UNITS_6)
    engine.remove()
    assert norms.shape == (3,)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, oracle[name], rtol=1e-7, atol=1e-9, msg=name)


def test_user_norms_are_norms_of_the_summed_gradient_not_of_the_rows():
    model, batch, loss_fn = _model("bert")
    per_user = _per_user(loop_grads(model, batch, loss_fn), UNITS_6)
    expected = sum(g.reshape(3, -1).pow(2).sum(1) for g in per_user.values()).sqrt()
    engine = ClippingEngine(model, max_grad_norm=1.0)
    norms = engine.backward(loss_fn(model, batch), units=UNITS_6)
    engine.remove()
    torch.testing.assert_close(norms, expected, rtol=1e-8, atol=1e-10)


def test_one_row_per_user_is_exactly_example_level():
    model, batch, loss_fn = _model("gpt2")
    engine = ClippingEngine(model, max_grad_norm=0.05)
    model.zero_grad(set_to_none=True)
    n_ex = engine.backward(loss_fn(model, batch))
    example = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    n_user = engine.backward(loss_fn(model, batch), units=torch.arange(6))
    engine.remove()
    assert torch.equal(n_ex, n_user)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, example[n]), n


def test_unit_layout_rejects_float_ids_and_engine_rejects_wrong_length():
    with pytest.raises(PrivacyConfigError, match="units must be a 1-D integer"):
        UnitLayout(torch.tensor([0.0, 1.0]))
    model, batch, loss_fn = _model("bert")
    engine = ClippingEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"units must be a Tensor\[6\]"):
        engine.backward(loss_fn(model, batch), units=torch.tensor([0, 1]))
    engine.remove()


class _Scale(torch.nn.Module):
    """A module no closed-form rule covers: the torch.func fallback instantiates its per-example gradients."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def test_fallback_rule_users_are_summed_before_the_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), _Scale(3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).squeeze(1)

    batch = {"x": x, "y": y}
    oracle = expected_clipped_sum(_per_user(loop_grads(model, batch, loss_fn), UNITS_6), c=0.1, style="flat")
    engine = ClippingEngine(model, max_grad_norm=0.1)
    engine.backward(loss_fn(model, batch), units=UNITS_6)
    engine.remove()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, oracle[name], rtol=1e-7, atol=1e-10, msg=name)
