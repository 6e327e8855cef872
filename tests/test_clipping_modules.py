"""ClippingEngine on small hand-built models: fallback, reuse, validation errors, non-finite, bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.errors import PrivacyConfigError, UnsupportedModuleError
from tests.test_clipping_oracle import expected_clipped_sum, loop_grads


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ScaleShift(nn.Module):
    """A custom layer owning parameters and a trainable child (child covered by the Linear rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)

    def forward(self, x, *, gate=None):
        y = self.proj(torch.tanh(x * self.scale))
        return y if gate is None else y * gate


class Net(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d, padding_idx=0)
        self.norm = RMSNorm(d)
        self.block = ScaleShift(d)
        self.shared = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = self.block(h, gate=torch.sigmoid(h))
        h = self.shared(torch.relu(self.shared(h)))  # module called twice
        return self.head(self.ln(self.ln(h))).mean((1, 2))  # LayerNorm reused: instantiated sum


def net_loss(model, batch):
    return (model(batch["ids"]) - batch["y"]) ** 2


def net_batch(b=5, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (b, t), generator=g)
    return {"ids": ids, "y": torch.randn(b, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_fallback_and_reused_module_match_loop(style):
    torch.manual_seed(0)
    model = Net().double().train()
    batch = net_batch()
    truth = loop_grads(model, batch, net_loss)
    engine = ClippingEngine(model, max_grad_norm=0.01, clipping=style)
    assert type(engine._rules[model.norm]).__name__ == "FunctorchRule"
    assert type(engine._rules[model.block]).__name__ == "FunctorchRule"
    got = engine.per_example_gradients(net_loss(model, batch))
    for n in truth:
        torch.testing.assert_close(got[n], truth[n], rtol=1e-7, atol=1e-10, msg=n)
    engine.backward(net_loss(model, batch))
    expected = expected_clipped_sum(truth, c=0.01, style=style)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-7, atol=1e-10, msg=n)


def test_linear_with_2d_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    loss_fn = lambda m, b: (m(b["x"]).squeeze(1) - b["y"]) ** 2  # noqa: E731
    batch = {"x": x, "y": y}
    truth = loop_grads(model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=0.1)
    got = engine.per_example_gradients(loss_fn(model, batch))
    for n in truth:
        torch.testing.assert_close(got[n], truth[n], msg=n)


def test_batchnorm_rejected_before_training():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        ClippingEngine(model, max_grad_norm=1.0)


def test_uncoverable_parameters_rejected():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.extra = nn.ParameterList([nn.Parameter(torch.zeros(3))])
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x + self.extra[0])

    with pytest.raises(UnsupportedModuleError, match="extra"):
        ClippingEngine(Holder(), max_grad_norm=1.0)
    rnn = nn.Sequential(nn.LSTM(3, 3))
    with pytest.raises(UnsupportedModuleError, match="LSTM"):
        ClippingEngine(rnn, max_grad_norm=1.0)


def test_invalid_arguments():
    model = nn.Sequential(nn.Linear(2, 1))
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        ClippingEngine(model, max_grad_norm=0.0)
    with pytest.raises(PrivacyConfigError, match="clipping"):
        ClippingEngine(model, max_grad_norm=1.0, clipping="adaptive")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError):
        ClippingEngine(model, max_grad_norm=1.0)


def test_non_finite_example_contributes_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = float("inf")
    engine = ClippingEngine(model, max_grad_norm=0.5)
    norms = engine.backward(model(x).squeeze(1))
    assert not torch.isfinite(norms[2]) and bool(torch.isfinite(norms[[0, 1, 3]]).all())
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    engine.backward(model(x[[0, 1, 3]]).squeeze(1))
    for n, p in model.named_parameters():
        assert bool(torch.isfinite(got[n]).all()), n
        torch.testing.assert_close(got[n], p.grad, msg=n)


def test_bf16_autocast_close_to_float32():
    from tests.test_clipping_oracle import bert_batch, cls_loss
    from hf_ewtune.testing import tiny_bert

    model = tiny_bert().train()
    batch = bert_batch()
    engine = ClippingEngine(model, max_grad_norm=0.05)
    ref_norms = engine.backward(cls_loss(model, batch))
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cls_loss(model, batch)
    norms = engine.backward(loss.float())
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, ref_norms, rtol=0.1, atol=1e-3)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), n
    num = sum((p.grad - ref[n]).pow(2).sum() for n, p in model.named_parameters()).sqrt()
    den = sum(v.pow(2).sum() for v in ref.values()).sqrt()
    assert float(num / den) < 0.1


def test_parameter_used_outside_its_module_is_detected():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 1)

        def forward(self, x):
            return self.b(self.a(x)) + (x @ self.a.weight).sum(1, keepdim=True)  # a.weight used directly

    model = Sneaky()
    engine = ClippingEngine(model, max_grad_norm=1.0)
    with pytest.raises(UnsupportedModuleError, match="a.weight"):
        engine.backward(model(torch.randn(4, 3)).squeeze(1))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("style", ["flat", "per_layer"])
def test_long_sequence_narrow_linear_instantiated_and_cached(style):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()  # 2 T^2 > d_in d_out
    batch = {"x": torch.randn(5, 20, 2, dtype=torch.float64), "y": torch.randn(5, dtype=torch.float64)}
    loss_fn = lambda m, b: (m(b["x"]).mean((1, 2)) - b["y"]) ** 2  # noqa: E731
    truth = loop_grads(model, batch, loss_fn)
    engine = ClippingEngine(model, max_grad_norm=0.01, clipping=style)
    engine.backward(loss_fn(model, batch))
    expected = expected_clipped_sum(truth, c=0.01, style=style)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


def test_docstring_examples_run():
    import doctest

    import hf_ewtune.clipping as pkg
    import hf_ewtune.clipping.engine as eng

    for mod in (pkg, eng):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


@pytest.mark.slow
def test_real_minilm_clipped_sum_matches_loop():
    from transformers import AutoModelForSequenceClassification

    from hf_ewtune.data import minilm_path
    from tests.test_clipping_oracle import bert_batch, cls_loss

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).double()
    model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    batch = bert_batch(3, 12, vocab=model.config.vocab_size, seed=3)
    truth = loop_grads(model, batch, cls_loss)
    engine = ClippingEngine(model, max_grad_norm=0.1)
    norms = engine.backward(cls_loss(model, batch))
    b = norms.shape[0]
    true_norms = sum(v.reshape(b, -1).pow(2).sum(1) for v in truth.values()).sqrt()
    torch.testing.assert_close(norms, true_norms)
    expected = expected_clipped_sum(truth, c=0.1, style="flat")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
