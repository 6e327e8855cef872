"""Ghost-norm Gram matrices ``A A^T`` are shared by the layers that read one input and freed after the last of them.

At long sequences each Gram is ``B T^2`` floats (32 MiB for B = 2, T = 2048); keeping one per distinct input until
the whole clipping step ends made DP peak memory grow with depth (issue 14, item 4).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping import linear as linear_rule


class QKVThenOut(nn.Module):
    """Three Linears read the same input (like Q/K/V), a fourth reads another one (like o_proj / down_proj)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x) + self.v(x)
        return self.o(torch.tanh(h)).sum((1, 2))


def _grams_alive_after_each_norm(monkeypatch) -> tuple[list[int], int]:
    alive: list[int] = []
    computed = {"n": 0}
    original_norm_sq = linear_rule.LinearRule.norm_sq
    original_bmm = torch.bmm

    def spy(self, rec, role):
        out = original_norm_sq(self, rec, role)
        if role == "weight":
            alive.append(sum(1 for k in rec.shared if isinstance(k, tuple) and k[0] == "gram"))
        return out

    def counting_bmm(a, b):
        if a.shape[-1] == 16 and b.shape[-2] == 16 and a.shape[-2] == b.shape[-1]:  # A A^T (T x T, inner dim d)
            computed["n"] += 1
        return original_bmm(a, b)

    monkeypatch.setattr(linear_rule.LinearRule, "norm_sq", spy)
    monkeypatch.setattr(linear_rule.torch, "bmm", counting_bmm)
    torch.manual_seed(0)
    model = QKVThenOut().double()
    x = torch.randn(3, 2, 16, dtype=torch.float64)  # T = 2: 2 T^2 = 8 < 16 * 16, ghost norms everywhere
    assert linear_rule.use_ghost(2, 16, 16)
    engine = ClippingEngine(model, max_grad_norm=1e6)
    engine.backward(model(x))
    engine.remove()
    return alive, computed["n"]


def test_gram_of_a_shared_input_is_kept_until_its_last_reader_then_freed(monkeypatch):
    alive, _ = _grams_alive_after_each_norm(monkeypatch)
    # q, k: the shared Gram stays for the next reader; v: its last reader, freed; o: its own Gram, freed at once.
    # (Before the fix the counts grew to [1, 1, 1, 2]: every Gram lived until the end of the clipping step.)
    assert alive == [1, 1, 0, 0]


def test_gram_of_a_shared_input_is_computed_once(monkeypatch):
    _, grams = _grams_alive_after_each_norm(monkeypatch)
    # One A A^T for q/k/v and one for o. (Each G G^T has inner dim d_out = 16 too, so count those 4 as well.)
    assert grams == 2 + 4


def test_norms_with_freed_grams_equal_instantiated_norms():
    torch.manual_seed(0)
    model = QKVThenOut().double()
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    engine = ClippingEngine(model, max_grad_norm=1e6)
    norms = engine.backward(model(x))
    per_example = engine.per_example_gradients(model(x))
    engine.remove()
    expected = torch.cat([g.reshape(3, -1) for g in per_example.values()], 1).pow(2).sum(1).sqrt()
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t,blocks", [(127, 1), (128, 3), (129, 3), (1024, 10), (1031, 10)])
def test_grams_from_lower_triangle_blocks_give_the_instantiated_norms(t, blocks):
    """From T = GRAM_SPLIT_MIN_T the Grams are built from the blocks of their lower triangle (off-diagonal ones
    weighted 2), T cut into 2 to 4 pieces, unequal when T does not divide evenly."""
    d = 48 if t < 1000 else 16
    x_probe = torch.zeros(1, t, 2)
    assert len(linear_rule.gram_blocks(x_probe)) == blocks
    torch.manual_seed(t)
    model = QKVThenOut(d).double()
    x = torch.randn(2, t, d, dtype=torch.float64)
    engine = ClippingEngine(model, max_grad_norm=1e6)
    # Force the ghost (Gram) path at every length, whatever keep_fits / use_ghost would pick for these small widths.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear_rule, "use_ghost", lambda *_: True)
        mp.setattr(linear_rule, "keep_fits", lambda *_, **__: False)
        norms = engine.backward(model(x))
    per_example = engine.per_example_gradients(model(x))
    engine.remove()
    expected = torch.cat([g.reshape(2, -1) for g in per_example.values()], 1).pow(2).sum(1).sqrt()
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=1e-12)
