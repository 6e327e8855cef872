"""Per-example gradient clipping engine (hooks on the original modules, one backward pass).

Example:
    >>> import torch
    >>> from hf_ewtune.clipping import ClippingEngine
    >>> model = torch.nn.Linear(3, 1)
    >>> engine = ClippingEngine(model, max_grad_norm=0.5)
    >>> norms = engine.backward(model(torch.randn(4, 3)).squeeze(1))
    >>> bool(model.weight.grad.norm() <= 4 * 0.5 + 1e-6)
    True
"""

from __future__ import annotations

from .engine import CLIPPING_STYLES, ClippingEngine

__all__ = ["ClippingEngine", "CLIPPING_STYLES"]
