"""Gradient (activation) checkpointing under the one-backward clipping engine.

``torch.utils.checkpoint`` runs a checkpointed block's forward a second time during the backward pass. The
engine's forward hooks fire again then, and how that second call must be treated depends on the mode:

* **non-reentrant** (``use_reentrant=False``, Hugging Face's default): the first forward builds the full autograd
  graph (the hooks record it as usual); the recomputation only refills the tensors autograd saved and its outputs
  receive no gradient. Its hook firings are *ignored* (no second record, no second clipping). They are recognised
  by torch's ``_recomputation_hook`` being the active saved-tensor hook.
* **reentrant** (``use_reentrant=True``): the first forward runs under ``no_grad`` (the hooks record nothing),
  and the recomputation, inside the backward, builds a graph of its own and runs an inner
  ``torch.autograd.backward`` on it. Its hook firings are *recorded* into the backward in progress, and each
  output's gradient is caught by a pre-hook on its autograd node when the inner backward reaches it. The inner
  backward also accumulates the *raw* parameter gradients into ``p.grad``: :func:`raw_gradient_guard` stashes
  ``p.grad`` before the engine's backward, throws those raw sums away and restores the stash, so only clipped
  sums ever reach ``p.grad``.

torch refuses ``autograd.grad`` through reentrant blocks, so when the graph holds one the engine runs a plain
``backward()`` instead and catches the recorded outputs' gradients with node pre-hooks
(:func:`catch_output_grads`); the raw parameter gradients that this backward also computes are discarded by
:func:`raw_gradient_guard`. Reentrant checkpointing therefore costs the weight-gradient products once more;
non-reentrant checkpointing (the default) does not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..errors import UnsupportedModuleError
from ._base import Record

_REENTRANT_NODE = "CheckpointFunctionBackward"


def in_nonreentrant_recompute() -> bool:
    """Whether the current code runs inside the recomputation of a non-reentrant ``torch.utils.checkpoint`` block."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - every supported torch has it
        return False
    hooks = top(True)
    if not hooks:
        return False
    return getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook")


def is_reentrant_checkpoint_node(node: Any) -> bool:
    """Whether an autograd node is the backward of a reentrant ``torch.utils.checkpoint`` block."""
    return type(node).__name__ == _REENTRANT_NODE


def catch_output_grads(records: list[Record], owners: list[tuple[int, int]]) -> None:
    """Catch each recorded output's gradient with a pre-hook on its autograd node (for a plain ``backward()``)."""
    for ri, k in owners:
        edge = records[ri].edges[k]
        edge.node.register_prehook(_grad_catcher(records[ri], k, edge.output_nr))


class RecomputeCapture:
    """Collects the records of reentrant recomputations that run during one engine backward.

    Args:
        records: The list of records of the backward in progress (appended to).
        batch_size: ``B`` of the backward in progress.
        shared: The per-backward cache shared by all records.
    """

    def __init__(self, records: list[Record], *, batch_size: int, shared: dict) -> None:
        self.records = records
        self.batch_size = batch_size
        self.shared = shared

    def add(self, rec: Record) -> None:
        """Record one recomputed call; its output gradients arrive through node pre-hooks in the inner backward."""
        rec.edges = [get_gradient_edge(t) for t in rec.outputs]
        rec.out_meta = [(t.shape, t.dtype, t.device) for t in rec.outputs]
        rec.outputs = None
        rec.grads = [None] * len(rec.edges)
        rec.batch_size = self.batch_size
        rec.shared = self.shared
        for k, edge in enumerate(rec.edges):
            edge.node.register_prehook(_grad_catcher(rec, k, edge.output_nr))
        self.records.append(rec)


def _grad_catcher(rec: Record, k: int, output_nr: int):
    def hook(grad_outputs):
        g = grad_outputs[output_nr]
        if g is not None:
            rec.grads[k] = g if rec.grads[k] is None else rec.grads[k] + g
        return None

    return hook


@contextlib.contextmanager
def raw_gradient_guard(params: dict[str, nn.Parameter]) -> Iterator[dict[str, bool]]:
    """Stash ``p.grad``, yield, then drop whatever raw gradient autograd accumulated and restore the stash.

    The yielded dict is filled, on exit, with the names of the parameters that received a raw gradient (a
    reentrant checkpoint's inner backward); the caller checks that each of them was recorded by the engine.
    """
    stash = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    leaked: dict[str, bool] = {}
    try:
        yield leaked
    finally:
        for name, p in params.items():
            if p.grad is not None:
                leaked[name] = True
            p.grad = stash[name]


def check_leaks(leaked: dict[str, bool], recorded_names: set[str]) -> None:
    """Raise if a parameter got a raw gradient without a record (its clipped gradient would be missing).

    Raises:
        UnsupportedModuleError: naming the parameters.
    """
    missing = sorted(n for n in leaked if n not in recorded_names)
    if missing:
        raise UnsupportedModuleError(
            f"Trainable parameters {missing} received gradients from a backward pass the clipping engine did not "
            "record (a custom autograd Function or checkpoint implementation that runs its own backward). Their raw "
            "gradients were discarded. Use torch.utils.checkpoint (either mode) or freeze these parameters."
        )
