"""The ways ``LinearRule`` reaches the norms give the same clipped update as a one-example-at-a-time loop.

``keep``: the per-example gradient is built during the backward as the output gradient arrives and kept for the
clipped sum; neither ``A`` nor ``G`` is held (chosen when it is no larger than them, e.g. every layer of a
1B-width Llama at T = 2048, every LoRA factor); ``keep_late``: the same after the backward, from the recorded
``A``/``G``, which are then let go (calls whose batch size was not known in the forward); ``ghost``: Gram
identity, clipped sum as a GEMM over ``A``/``G``; ``instantiate``: instantiated for the norm only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping import linear as linear_rule


class SharedInputNet(nn.Module):
    """Q/K/V-like Linears reading one input (with and without bias), a GPT-2 Conv1D, then an output Linear."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, 3, bias=False)
        self.v = Conv1D(d, d)
        self.o = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x).sum(-1, keepdim=True) + self.v(x)
        return self.o(torch.tanh(h)).pow(2).sum((1, 2))


def _naive_clipped_sum(model: nn.Module, x: torch.Tensor, c: float) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[i:i + 1]).sum(), list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, c / (float(norm) + 1e-6))
        for n, g in zip(params, grads):
            total[n] += scale * g
    return total


PATHS = {
    "keep": (lambda *a, **k: True, lambda *a: False),
    "keep_late": (lambda *a, **k: True, lambda *a: False),
    "ghost": (lambda *a, **k: False, lambda *a: True),
    "instantiate": (lambda *a, **k: False, lambda *a: False),
}


def force_path(monkeypatch, path: str) -> None:
    keep, ghost = PATHS[path]
    monkeypatch.setattr(linear_rule, "keep_fits", keep)
    monkeypatch.setattr(linear_rule, "use_ghost", ghost)
    if path == "keep_late":
        monkeypatch.setattr(linear_rule, "keeps_during_backward", lambda engine: False)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("t", [1, 5, 130])
def test_each_path_gives_the_one_at_a_time_clipped_update(path, t, monkeypatch):
    force_path(monkeypatch, path)
    torch.manual_seed(t)
    model = SharedInputNet().double()
    x = torch.randn(4, t, 6, dtype=torch.float64)
    expected = _naive_clipped_sum(model, x, c=0.05)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    norms = engine.backward(model(x))
    engine.remove()
    assert bool((norms > 0.05).all())  # every example is clipped: the factors matter
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)


def test_keep_path_lets_go_of_activations_and_output_gradients(monkeypatch):
    seen = []
    original = linear_rule.LinearRule._keep_per_example

    def spy(self, rec, role, a, g):
        out = original(self, rec, role, a, g)
        seen.append((rec.data, rec.grads, sorted(rec.cache)))
        return out

    monkeypatch.setattr(linear_rule.LinearRule, "_keep_per_example", spy)
    monkeypatch.setattr(linear_rule, "keeps_during_backward", lambda engine: False)
    torch.manual_seed(0)
    model = SharedInputNet(d=4)
    x = torch.randn(2, 64, 4)  # 4 * 4 <= 64 * (4 + 4): every layer keeps its per-example gradient
    engine = ClippingEngine(model, max_grad_norm=1.0)
    engine.backward(model(x))
    engine.remove()
    assert len(seen) == 4
    assert all(data is None and grads == [None] for data, grads, _ in seen)
    assert sorted(cache for _, _, cache in seen) == [["bias", "weight"]] * 3 + [["weight"]]


def test_keep_fits_compares_bytes_of_the_kept_gradient_with_the_stored_activations():
    # 1B-width Llama (hidden 2048, MLP 8192): Q/O from T = 1024, the MLP from T = 1639 (2048 * 8192 / 10240 = 1638.4)
    assert linear_rule.keep_fits(1024, 2048, 2048) and not linear_rule.keep_fits(1023, 2048, 2048)
    assert linear_rule.keep_fits(1639, 2048, 8192) and not linear_rule.keep_fits(1638, 2048, 8192)
    # bf16 activations (2 bytes) against a float32 per-example gradient: twice the tokens needed
    assert not linear_rule.keep_fits(2047, 2048, 2048, a_bytes=2, g_bytes=2)
    assert linear_rule.keep_fits(2048, 2048, 2048, a_bytes=2, g_bytes=2)


def test_records_are_let_go_while_the_clipped_sums_are_built(monkeypatch):
    """Holding every layer's A and G until all clipped sums existed made the DP step's peak the sum of both (4
    1B-width Llama layers at T = 1024: 1.21x the Trainer's memory; 1.01x after)."""
    holding = []
    seen_records = []
    original = linear_rule.LinearRule.clipped_sum

    def spy(self, rec, role, c):
        earlier = {id(r): r for r in seen_records if r is not rec}.values()
        holding.append(sum(r.data is not None or bool(r.cache) for r in earlier))
        seen_records.append(rec)
        return original(self, rec, role, c)

    monkeypatch.setattr(linear_rule.LinearRule, "clipped_sum", spy)
    force_path(monkeypatch, "ghost")
    torch.manual_seed(0)
    model = SharedInputNet().double()
    engine = ClippingEngine(model, max_grad_norm=0.1)
    engine.backward(model(torch.randn(3, 5, 6, dtype=torch.float64)))
    engine.remove()
    # q.weight, q.bias, k.weight, v.weight, v.bias, o.weight, o.bias: each record is let go after its last role,
    # so no earlier layer still holds its A and G when the next one's sum is built (old main: 0, 0, 1, 2, 2, 3, 3)
    assert holding == [0] * 7


class TiedBiasNet(nn.Module):
    """Two Linears share one bias Parameter (a reused parameter) while their weights are their own."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.bias = self.a.bias

    def forward(self, x):
        return (torch.tanh(self.a(x)) * self.b(x)).sum((1, 2))


def test_kept_layer_whose_bias_is_reused_elsewhere():
    """The weight of ``a`` is kept (A and G dropped) before the tied bias needs ``a``'s factors: the bias is then
    instantiated from the kept per-example bias gradient."""
    torch.manual_seed(0)
    model = TiedBiasNet().double()
    x = torch.randn(3, 40, 4, dtype=torch.float64)  # 4 * 4 <= 40 * 8: both weights are kept
    assert linear_rule.keep_fits(40, 4, 4, a_bytes=8, g_bytes=8, pe_bytes=8)
    expected = _naive_clipped_sum(model, x, c=0.05)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(model(x))
    engine.remove()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)


def test_kept_in_backward_the_engine_holds_neither_inputs_nor_output_gradients(monkeypatch):
    """Keeping during the backward: the records hold only the per-example gradients (built from the output
    gradient as it arrives and the input saved by autograd), and autograd returns 0-dim tokens, not ``G``."""
    import hf_ewtune.clipping.engine as engine_module

    held = []
    original = engine_module.ClippingEngine._run_backward

    def spy(self, loss):
        records, uses, b = original(self, loss)
        held.extend((rec.eager, rec.data, [g.dim() for g in rec.grads], sorted(rec.cache)) for rec in records)
        return records, uses, b

    monkeypatch.setattr(engine_module.ClippingEngine, "_run_backward", spy)
    torch.manual_seed(0)
    model = SharedInputNet(d=4)
    x = torch.randn(2, 64, 4)  # 4 * 4 <= 64 * (4 + 4): every call keeps its per-example gradient
    expected = _naive_clipped_sum(model, x, c=0.05)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(model(x))
    engine.remove()
    assert len(held) == 4
    assert all(eager and data is None and dims == [0] for eager, data, dims, _ in held)
    assert sorted(cache for *_, cache in held) == [["bias", "weight"]] * 3 + [["weight"]]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("bias", [False, True], ids=["same_tensor", "view_copied"])
def test_kept_output_may_be_modified_in_place(bias):
    """The kept call's output stays an ordinary tensor, so an in-place op after the layer is legal: without a bias
    it is the layer's own output tensor (marked dirty, no copy); with one, ``F.linear`` returns a view, which is
    copied."""
    seen = []

    class InPlaceAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=bias)

        def forward(self, x):
            h = self.lin(x)
            seen.append(type(h.grad_fn).__name__)
            h.mul_(2.0).relu_()
            return h.sum((1, 2))

    torch.manual_seed(0)
    model = InPlaceAfter().double()
    x = torch.randn(3, 40, 4, dtype=torch.float64)
    expected = _naive_clipped_sum(model, x, c=0.05)
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(model(x))
    engine.remove()
    assert seen[-1] == "_KeepInBackwardBackward"
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_kept_calls_leave_nothing_alive_after_the_step(ckpt, monkeypatch):
    """Every record of a kept call (the first forward's and, under non-reentrant checkpointing, the recomputed
    forward's) is freed after the step. A record that the autograd node holds strongly while the record holds
    the node is a cycle through C++ that Python's collector cannot see: the graph (and, under checkpointing, the
    recomputed activations) leaked every step."""
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    made = []
    original = linear_rule.LinearRule.capture

    def spy(self, engine, module, args, kwargs, output):
        rec, new_out = original(self, engine, module, args, kwargs, output)
        if rec is not None:
            made.append((rec.eager, weakref.ref(rec)))
        return rec, new_out

    monkeypatch.setattr(linear_rule.LinearRule, "capture", spy)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SharedInputNet(d=4)

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False) if ckpt else self.inner(x)

    torch.manual_seed(0)
    model = Blocks()
    x = torch.randn(2, 64, 4)  # every call keeps its per-example gradient
    engine = ClippingEngine(model, max_grad_norm=0.05)
    engine.backward(model(x))
    engine.remove()
    gc.collect()
    assert len(made) == (8 if ckpt else 4) and all(eager for eager, _ in made)
    assert [ref() for _, ref in made] == [None] * len(made)
