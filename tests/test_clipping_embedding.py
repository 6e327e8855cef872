"""``nn.Embedding`` per-example norms: rows summed per distinct token id equal a one-example-at-a-time loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.clipping.embedding import token_row_norms


class Bag(nn.Module):
    def __init__(self, v: int, d: int, padding_idx=None) -> None:
        super().__init__()
        self.emb = nn.Embedding(v, d, padding_idx=padding_idx)
        self.w = nn.Parameter(torch.randn(d, dtype=torch.float64), requires_grad=False)

    def forward(self, ids):
        return torch.tanh(self.emb(ids) @ self.w).pow(2).sum(1)  # per-example losses, positions interact


@pytest.mark.parametrize("t", [1, 3, 40])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_norms_equal_the_loop(t, padding_idx):
    torch.manual_seed(t)
    model = Bag(v=6, d=5, padding_idx=padding_idx).double()  # 6 ids over 40 positions: many repeats
    ids = torch.randint(0, 6, (4, t))
    ids[0] = ids[0, 0]  # one example holds a single id throughout
    truth = []
    for i in range(4):
        (g,) = torch.autograd.grad(model(ids[i:i + 1]).sum(), [model.emb.weight])
        truth.append(g.pow(2).sum())
    engine = ClippingEngine(model, max_grad_norm=1e6)
    norms = engine.backward(model(ids))
    engine.remove()
    torch.testing.assert_close(norms.pow(2), torch.stack(truth), rtol=1e-10, atol=1e-12)


def test_token_row_norms_keeps_examples_apart():
    """The same id in two examples is two rows (one per example), not one."""
    ids = torch.tensor([[3, 3], [3, 1]])
    g = torch.tensor([[[1.0], [2.0]], [[4.0], [5.0]]])
    torch.testing.assert_close(token_row_norms(ids, g, num_embeddings=4), torch.tensor([9.0, 41.0]))
