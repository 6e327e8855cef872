"""Audits of multi-process runs (``accelerate launch``, DDP): one canary draw, every replica audited.

Under DP-DDP every process must release the same noisy gradient (rank 0 adds the noise once, the sums are
all-reduced), so every replica's canary scores must be the same. A bug that lets the noise reach only some
replicas (e.g. noise added after the all-reduce, on rank 0 only) leaves the other replicas trained on
noise-free gradients; auditing rank 0 alone would miss it. So the audit gathers every rank's scores:

* replicas that agree (as they must) are audited once, exactly as a single process;
* replicas that differ are a bug in themselves (the released model depends on which rank saves it): each
  one is audited at confidence ``1 - (1 - confidence) / W`` (Bonferroni over the ``W`` processes, so the
  largest bound is still valid at ``confidence``) and the largest bound is reported.

Every function here is a no-op in a single process (``torch.distributed`` not initialised or world size 1),
and must otherwise be called by every rank (they run collectives).

Example:
    >>> import numpy as np
    >>> [s.tolist() for s in gather_scores(np.array([1.0, 2.0]))]  # one process: its own scores
    [[1.0, 2.0]]
    >>> shared_seed(None) is not None and shared_seed(7) == 7
    True
"""

from __future__ import annotations

import numpy as np
import torch

from hf_ewtune.sampling import new_seed


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed(seed: int | None) -> int:
    """``seed``, or one OS-entropy seed drawn on rank 0 and broadcast (so every rank draws the same canaries)."""
    if seed is not None:
        return int(seed)
    drawn = new_seed()
    if _world() > 1:
        t = torch.tensor([drawn], dtype=torch.int64, device=_device())
        torch.distributed.broadcast(t, src=0)
        drawn = int(t.item())
    return drawn


def gather_scores(scores: np.ndarray) -> list[np.ndarray]:
    """Every process's canary scores, in rank order (``[scores]`` in a single process)."""
    world = _world()
    if world == 1:
        return [np.asarray(scores, dtype=np.float64)]
    local = torch.as_tensor(np.asarray(scores, dtype=np.float64), device=_device())
    out = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(out, local)
    return [t.cpu().numpy() for t in out]


def replicas_agree(rank_scores: list[np.ndarray]) -> bool:
    """True when every rank's scores equal rank 0's (to float rounding: 1e-6 relative to the largest score)."""
    ref = rank_scores[0]
    tol = 1e-6 * max(1.0, float(np.abs(ref).max(initial=0.0)))
    return all(s.shape == ref.shape and bool(np.all(np.abs(s - ref) <= tol)) for s in rank_scores[1:])


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that prints and writes the report."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True
