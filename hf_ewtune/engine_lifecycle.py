"""Who owns a model's clipping hooks: the :class:`~hf_ewtune.DPTrainer` that attached them, and no one else.

There is no module-level registry. The model carries a *weak* reference to the engine whose hooks are on it
(:func:`hf_ewtune.clipping.attached_engine`), and the hooks are removed when their trainer is garbage-collected
(``weakref.finalize``), so deleting the trainer (and the model) frees both.

A second ``DPTrainer`` on a model whose hooks belong to a live trainer detaches the first trainer's hooks
explicitly and logs a warning; the first trainer then refuses to train
(:class:`~hf_ewtune.errors.PrivacyStateError`) instead of silently training without clipping.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

from hf_ewtune.errors import PrivacyStateError

if TYPE_CHECKING:  # pragma: no cover
    from hf_ewtune.clipping import ClippingEngine

logger = logging.getLogger(__name__)


def attach_engine(owner: Any, model: nn.Module, *, max_grad_norm: float, clipping: str) -> "ClippingEngine":
    """Build a :class:`~hf_ewtune.clipping.ClippingEngine` on ``model`` for ``owner`` (a trainer).

    Hooks left on ``model`` by an earlier engine are removed first, with a warning. The new engine's hooks
    are removed when ``owner`` is garbage-collected.
    """
    from hf_ewtune.clipping import ClippingEngine, attached_engine

    previous = attached_engine(model)
    if previous is not None:
        logger.warning(
            "DPTrainer: %s already has per-example clipping hooks from another DPTrainer (or ClippingEngine); "
            "they are removed now and that trainer can no longer train. Call trainer.remove_hooks() on the old "
            "trainer first to make this explicit.", type(model).__name__,
        )
        previous.remove()
    engine = ClippingEngine(model, max_grad_norm=max_grad_norm, clipping=clipping)
    weakref.finalize(owner, engine.remove)
    return engine


def require_attached(engine: "ClippingEngine | None") -> None:
    """Raise :class:`PrivacyStateError` if ``engine`` is missing or its hooks were removed."""
    if engine is None or not engine.attached:
        raise PrivacyStateError(
            "this DPTrainer's per-example clipping hooks were removed (remove_hooks(), or a newer DPTrainer was "
            "built on the same model): training now would not clip per example. Build a new DPTrainer."
        )
