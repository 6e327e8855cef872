"""Per-*unit* gradient norms (user-level DP): the rows of one unit are clipped together, as one gradient.

With user-level privacy a micro-batch holds whole users (all of a user's sampled rows land in ONE
micro-batch, see :mod:`hf_ewtune.user_level`). Each user's contribution is ``g_u = sum_{i in u} g_i``, clipped
to ``C`` as one unit: ``sum_u c_u g_u = sum_i c_{u(i)} g_i``. So the clipped sum is the usual one with the
row factor ``c_i = c_{u(i)}``; only the NORMS change: ``||g_u||`` is the norm of a sum, which per-example
norms do not give.

How each unit norm is computed, exactly, in the same single backward:

* Linear / GPT-2 Conv1D, Embedding, LayerNorm: a unit's gradient has the same form as one example's with
  the unit's rows laid end to end along the token axis (``g_u = G_u^T A_u`` with ``A_u`` the concatenated
  activations). :class:`UnitLayout` builds these merged tensors (``[U, K*T, d]``, padded with zero rows,
  which contribute nothing) and the rule's own ``norm_sq`` runs on them: ghost norm
  ``<A_u A_u^T, G_u G_u^T>`` (all cross-row pairs of the unit included) or instantiation, whichever the rule
  picks for ``K*T`` tokens.
* Any other rule (``torch.func`` fallback, rules registered later): the per-example gradients are
  instantiated (the rule does so anyway) and summed per unit with ``index_add``.
* Tied / reused parameters: cross terms of the merged factors (ghost), or the instantiated sum over uses.

When every unit has one row the per-example norms are used unchanged, so a user with one row is clipped
bit-for-bit like an example.

Example:
    >>> import torch
    >>> layout = UnitLayout(torch.tensor([7, 3, 7, 9]))
    >>> layout.num_units, layout.width, layout.index.tolist()
    (3, 2, [1, 0, 1, 2])
    >>> layout.merge(torch.arange(4.0).view(4, 1, 1)).squeeze(-1).tolist()
    [[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PrivacyConfigError
from ._base import Record, factor_inner
from .embedding import EmbeddingRule
from .layer_norm import LayerNormRule
from .linear import LinearRule


class UnitLayout:
    """Which rows of a backward belong to which privacy unit (user).

    Args:
        units: ``Tensor[B]`` of integer unit ids (any values; rows with equal ids are one unit). Units are
            numbered ``0..U-1`` in increasing id order.

    Raises:
        PrivacyConfigError: ``units`` is not a 1-D integer tensor.
    """

    def __init__(self, units: torch.Tensor) -> None:
        if not isinstance(units, torch.Tensor) or units.dim() != 1 or units.is_floating_point() or units.is_complex():
            raise PrivacyConfigError(
                f"units must be a 1-D integer Tensor[B] of privacy-unit ids, got {getattr(units, 'shape', units)!r}.")
        ids, index = torch.unique(units, return_inverse=True)
        self.batch_size = int(units.shape[0])
        self.num_units = int(ids.shape[0])
        self.index = index  # [B]: unit of each row, 0..U-1
        counts = torch.bincount(index, minlength=self.num_units)
        self.counts = counts
        self.width = int(counts.max()) if self.batch_size else 0  # K: rows of the largest unit
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(index)
        slot[order] = torch.arange(self.batch_size, device=index.device) - starts[index[order]]
        self.slot = slot  # [B]: position of each row inside its unit

    @property
    def singletons(self) -> bool:
        """Whether every unit has exactly one row (then unit norms are the per-example norms)."""
        return self.width <= 1

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, T, *rest]`` -> ``Tensor[U, K*T, *rest]``: each unit's rows end to end, zero-padded."""
        b, tt, rest = t.shape[0], t.shape[1], t.shape[2:]
        out = torch.zeros(self.num_units, self.width, tt, *rest, dtype=t.dtype, device=t.device)
        out[self.index, self.slot] = t
        return out.reshape(self.num_units, self.width * tt, *rest)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, *rest]`` -> ``Tensor[U, *rest]``: the sum of each unit's rows."""
        out = torch.zeros(self.num_units, *t.shape[1:], dtype=t.dtype, device=t.device)
        return out.index_add_(0, self.index, t)

    def to_rows(self, per_unit: torch.Tensor) -> torch.Tensor:
        """``Tensor[..., U]`` -> ``Tensor[..., B]``: each row gets its unit's value (e.g. clipping factors)."""
        return per_unit[..., self.index]


def merged_record(rec: Record, layout: UnitLayout, shared: dict) -> Record | None:
    """The record of ``rec`` with each unit's rows laid end to end (``None``: the rule has no such form)."""
    rule = rec.rule
    b = rec.batch_size
    g = rec.grads[0] if rec.grads else None
    if g is None or len(rec.grads) != 1 or rec.data is None:  # kept calls: their per-example gradients are summed
        return None
    if isinstance(rule, LinearRule):
        data = layout.merge(rec.data.reshape(b, -1, rec.data.shape[-1]))
        grad = layout.merge(g.reshape(b, -1, g.shape[-1]))
    elif isinstance(rule, EmbeddingRule):
        data = layout.merge(rec.data.reshape(b, -1))
        grad = layout.merge(g.reshape(b, -1, g.shape[-1]))
    elif isinstance(rule, LayerNormRule):
        shape = tuple(rec.module.normalized_shape)
        data = layout.merge(rec.data.reshape(b, -1, *shape))
        grad = layout.merge(g.reshape(b, -1, *shape))
    else:
        return None
    merged = Record(rec.module, rule, data, None, key=("units", rec.key), shared=shared)
    merged.grads = [grad]
    merged.out_meta = rec.out_meta
    merged.batch_size = layout.num_units
    return merged


def unit_norms_sq(
    uses: dict[int, list[tuple[Record, str]]], layout: UnitLayout, dtype: torch.dtype
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Squared per-unit gradient norms of every used parameter, and the instantiated per-EXAMPLE sums over
    uses of the parameters that had to be instantiated (for the clipped sum).

    Returns:
        ``({param id: Tensor[U]}, {param id: Tensor[B, *shape]})``.
    """
    shared: dict = {}
    merged: dict[int, Record | None] = {}

    def view(rec: Record) -> Record | None:
        if id(rec) not in merged:
            merged[id(rec)] = merged_record(rec, layout, shared)
        return merged[id(rec)]

    norm_sq: dict[int, torch.Tensor] = {}
    pe_sum: dict[int, torch.Tensor] = {}
    for pid, plist in uses.items():
        views = [view(rec) for rec, _ in plist]
        if all(v is not None for v in views):
            if len(plist) == 1:
                norm_sq[pid] = views[0].rule.norm_sq(views[0], plist[0][1]).to(dtype)
                continue
            facs = [v.rule.factors(v, role) for v, (_, role) in zip(views, plist)]
            if all(f is not None for f in facs):
                n2: Any = 0
                for u in range(len(facs)):
                    n2 = n2 + factor_inner(facs[u], facs[u])
                    for w in range(u + 1, len(facs)):
                        n2 = n2 + 2 * factor_inner(facs[u], facs[w])
                norm_sq[pid] = n2.to(dtype)
                continue
        pe = sum(rec.rule.cached_per_example(rec, role).to(dtype) for rec, role in plist)
        if len(plist) > 1:
            pe_sum[pid] = pe
        unit_pe = layout.sum(pe)
        norm_sq[pid] = unit_pe.reshape(layout.num_units, -1).pow(2).sum(1)
    return norm_sq, pe_sum


__all__ = ["UnitLayout", "merged_record", "unit_norms_sq"]
