"""Per-example gradients of ``nn.Embedding``.

Norm (never materialises ``[B, V, d]``): the example's gradient has one row per distinct token id, the sum of
the output gradients at the positions holding it, so ``||dE_i||^2 = sum_v ||sum_{t: x_t = v} g_t||^2`` over its
non-padding positions: a sort of the ids and one ``index_add`` over ``B T d`` values (the equivalent Gram form
``sum_{s,t} 1[x_s = x_t] (g_s . g_t)`` costs ``B T^2 d``: 13x slower at T = 2048, d = 2048). Clipped sum:
``index_add`` of ``c_i g_{i,t}`` into row ``x_{i,t}``.

Hugging Face models call position embeddings with ``[1, T]`` ids and broadcast the ``[1, T, d]`` output over
the batch, which hides the per-example gradient. The hook therefore expands such an output (and the ids) to
the batch size seen by the model's forward, so that each example's gradient is the sum over its own positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import Record, Rule, compute_dtype, tensor_arg


class EmbeddingRule(Rule):
    name = "embedding"

    def capture(self, engine, module, args, kwargs, output):
        ids = tensor_arg(args, kwargs, "input")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None, None
        new_out = None
        b = engine.current_batch_size
        if ids.dim() >= 1 and ids.shape[0] == 1 and b is not None and b > 1:
            ids = ids.expand(b, *ids.shape[1:])
            output = new_out = output.expand(b, *output.shape[1:])
        return Record(module, self, ids.detach(), [output]), new_out

    def _ids_g(self, rec: Record) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        module = rec.module
        b = rec.batch_size
        ids = rec.data.reshape(b, -1)
        g = rec.grads[0]
        g = g.reshape(b, -1, g.shape[-1]).to(compute_dtype(g))
        valid = torch.ones_like(ids, dtype=torch.bool)
        if module.padding_idx is not None:
            valid = ids != module.padding_idx
            g = g * valid.unsqueeze(-1).to(g.dtype)
        return ids, g, valid

    def factors(self, rec: Record, role: str):
        ids, g, _ = self._ids_g(rec)
        return ("ids", ids, g)

    def norm_sq(self, rec: Record, role: str) -> torch.Tensor:
        ids, g, _ = self._ids_g(rec)
        return token_row_norms(ids, g, rec.module.num_embeddings)

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        ids, g, _ = self._ids_g(rec)
        b, v, d = ids.shape[0], rec.module.num_embeddings, g.shape[-1]
        rows = (ids + torch.arange(b, device=ids.device).unsqueeze(1) * v).reshape(-1)
        out = torch.zeros(b * v, d, dtype=g.dtype, device=g.device)
        return out.index_add_(0, rows, g.reshape(-1, d)).view(b, v, d)

    def clipped_sum(self, rec: Record, role: str, c: torch.Tensor) -> torch.Tensor:
        if role in rec.cache:
            return super().clipped_sum(rec, role, c)
        ids, g, _ = self._ids_g(rec)
        d = g.shape[-1]
        gc = (g * c.to(g.dtype).view(-1, 1, 1)).reshape(-1, d)
        out = torch.zeros(rec.module.num_embeddings, d, dtype=g.dtype, device=g.device)
        return out.index_add_(0, ids.reshape(-1), gc)


def token_row_norms(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Squared norms ``[B]`` of the per-example embedding gradients: rows of ``g [B, T, d]`` summed per distinct
    id of ``ids [B, T]`` (ids below ``num_embeddings``), then squared and added up per example.

    Example:
        >>> ids, g = torch.tensor([[1, 2, 1]]), torch.tensor([[[1.0], [5.0], [2.0]]])
        >>> token_row_norms(ids, g, num_embeddings=3)  # rows: id 1 -> 1 + 2 = 3, id 2 -> 5; 9 + 25
        tensor([34.])
    """
    b, d = ids.shape[0], g.shape[-1]
    key = ids.reshape(b, -1).long() + torch.arange(b, device=ids.device).unsqueeze(1) * num_embeddings
    rows, where = torch.unique(key.reshape(-1), return_inverse=True)
    sums = g.new_zeros(rows.numel(), d).index_add_(0, where, g.reshape(-1, d))
    return g.new_zeros(b).index_add_(0, rows // num_embeddings, sums.pow(2).sum(1))


def is_plain_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
