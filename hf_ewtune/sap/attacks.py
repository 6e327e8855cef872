"""Embedding-inversion attacks (EIA) on privatized representations, and the empirical-privacy metric.

* :func:`nn_inversion` — nearest neighbour against the word-embedding matrix (``split_layer == 0``). For d_chi
  noise under a uniform prior, L2 nearest neighbour is the maximum-likelihood decoder.
* :class:`LearnedInversion` — an MLP mapping each privatized vector to vocabulary logits, trained by the model
  owner on public text it pushes through its own bottom model and the (public) mechanism (any ``split_layer``).

``empirical_privacy = 1 - top-1 token recovery rate`` over non-special, non-padding tokens (RAPT / SAP metric).

Example:
    >>> import torch
    >>> table = torch.randn(100, 16)
    >>> ids = torch.randint(0, 100, (4, 8))
    >>> res = nn_inversion(table[ids], table, token_ids=ids)
    >>> res["top1"], res["empirical_privacy"]
    (1.0, 0.0)
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["nn_inversion", "LearnedInversion", "empirical_privacy", "median_nn_distance", "eval_positions"]


def empirical_privacy(recovery_rate: float) -> float:
    """``1 - recovery_rate`` (higher is more private)."""
    return 1.0 - float(recovery_rate)


def eval_positions(token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   exclude_ids: Iterable[int] = ()) -> torch.Tensor:
    """Boolean mask of the positions an attack is scored on: real (mask 1) and not a special/pad token."""
    keep = torch.ones_like(token_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    for t in set(int(x) for x in exclude_ids):
        keep &= token_ids != t
    return keep


def median_nn_distance(table: torch.Tensor, *, sample: int = 2000, seed: int = 0) -> float:
    """Median L2 distance from a vocabulary row to its nearest *other* row (for choosing eta via rho)."""
    g = torch.Generator().manual_seed(seed)
    table = table.detach().float()
    idx = torch.randperm(table.shape[0], generator=g)[:sample]
    d = torch.cdist(table[idx], table)
    d[torch.arange(len(idx)), idx] = float("inf")
    return float(d.min(-1).values.median())


@torch.no_grad()
def nn_inversion(hidden: torch.Tensor, table: torch.Tensor, *, token_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, exclude_ids: Iterable[int] = (), metric: str = "l2",
                 topk: int = 5, chunk: int = 2048) -> dict[str, float]:
    """Nearest-neighbour inversion of ``hidden`` ``[B, T, d]`` against ``table`` ``[V, d]``.

    Args:
        token_ids: True ids ``[B, T]`` (for scoring only).
        attention_mask: ``[B, T]``; padding is not scored.
        exclude_ids: Special/pad token ids, not scored.
        metric: ``"l2"`` (maximum likelihood for d_chi noise) or ``"cos"``.

    Returns:
        ``{"top1", "top5" (top-``topk``), "empirical_privacy", "n_tokens"}``. A prediction whose embedding row equals
        the true row (duplicate rows) counts as recovered.
    """
    keep = eval_positions(token_ids, attention_mask, exclude_ids)
    x = hidden.detach().float()[keep]
    y = token_ids[keep]
    tab = table.detach().float()
    if metric == "cos":
        tab = nn.functional.normalize(tab, dim=-1)
        x = nn.functional.normalize(x, dim=-1)
    elif metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cos', got {metric!r}")
    hit1 = hitk = 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        score = -torch.cdist(xs, tab) if metric == "l2" else xs @ tab.T
        pred = score.topk(min(topk, tab.shape[0]), dim=-1).indices
        same = (table[pred].float() == table[ys].float().unsqueeze(1)).all(-1) | (pred == ys.unsqueeze(1))
        hit1 += int(same[:, 0].sum())
        hitk += int(same.any(-1).sum())
    n = int(y.numel())
    top1 = hit1 / max(n, 1)
    return {"top1": top1, f"top{topk}": hitk / max(n, 1), "empirical_privacy": empirical_privacy(top1), "n_tokens": n}


class LearnedInversion(nn.Module):
    """MLP inversion model ``h~ -> vocabulary logits`` (per token), trained on public text.

    Args:
        hidden_size: Dimension ``d`` of the privatized representation.
        vocab_size: Vocabulary size.
        width: MLP width.
        candidate_ids: Optional token ids the attacker predicts among (e.g. those seen in its public data,
            which keeps the output layer small); other tokens count as not recovered.

    Example:
        >>> import torch
        >>> att = LearnedInversion(hidden_size=8, vocab_size=20, width=32)
        >>> ids = torch.randint(0, 20, (64, 4)); table = torch.randn(20, 8)
        >>> _ = att.fit([(table[ids], ids, torch.ones_like(ids))], epochs=200, lr=1e-2)
        >>> att.evaluate(table[ids], token_ids=ids)["top1"] > 0.9
        True
    """

    def __init__(self, *, hidden_size: int, vocab_size: int, width: int = 512,
                 candidate_ids: torch.Tensor | None = None):
        super().__init__()
        if candidate_ids is not None:
            candidate_ids = torch.as_tensor(candidate_ids, dtype=torch.long).unique()
            lookup = torch.full((vocab_size,), -1, dtype=torch.long)
            lookup[candidate_ids] = torch.arange(len(candidate_ids))
        else:
            candidate_ids = torch.arange(vocab_size)
            lookup = torch.arange(vocab_size)
        self.register_buffer("candidate_ids", candidate_ids, persistent=False)
        self.register_buffer("_lookup", lookup, persistent=False)
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, len(candidate_ids))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over ``candidate_ids`` (the whole vocabulary by default)."""
        return self.net(hidden)

    def fit(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, epochs: int = 5,
            lr: float = 2e-3, exclude_ids: Iterable[int] = (), seed: int = 0) -> list[float]:
        """Train on ``(privatized hidden [B,T,d], token ids [B,T], attention mask [B,T])`` batches.

        The pairs must be generated by the attacker itself (public text through the bottom model and the
        mechanism); never train on the victim's data. Returns the mean loss per epoch.
        """
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        exclude = list(exclude_ids)
        losses = []
        self.train()
        for _ in range(epochs):
            tot, cnt = 0.0, 0
            for h, ids, mask in batches:
                keep = eval_positions(ids, mask, exclude)
                target = self._lookup[ids]
                keep &= target >= 0
                if not bool(keep.any()):
                    continue
                logits = self(h.detach().float()[keep])
                loss = nn.functional.cross_entropy(logits, target[keep])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * int(keep.sum())
                cnt += int(keep.sum())
            losses.append(tot / max(cnt, 1))
        self.eval()
        return losses

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor, *, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 exclude_ids: Iterable[int] = (), topk: int = 5) -> dict[str, float]:
        """Top-1 / top-k token recovery and empirical privacy on held-out privatized representations."""
        keep = eval_positions(token_ids, attention_mask, exclude_ids)
        x, y = hidden.detach().float()[keep], token_ids[keep]
        hit1 = hitk = 0
        for xs, ys in zip(x.split(4096), y.split(4096)):
            pred = self.candidate_ids[self(xs).topk(min(topk, len(self.candidate_ids)), dim=-1).indices]
            hit1 += int((pred[:, 0] == ys).sum())
            hitk += int((pred == ys.unsqueeze(1)).any(-1).sum())
        n = int(y.numel())
        top1 = hit1 / max(n, 1)
        return {"top1": top1, f"top{topk}": hitk / max(n, 1), "empirical_privacy": empirical_privacy(top1), "n_tokens": n}
