"""Differentially private TRL trainers: :class:`DPSFTTrainer` (instruction / chat SFT) and :class:`DPDPOTrainer`.

Install with ``pip install "hf_ewtune[trl]"`` (tested with the TRL range in :data:`TESTED_TRL`). Each class is
``DPTrainer`` placed before TRL's trainer in the inheritance chain, so TRL prepares the data (chat templates,
prompt/completion datasets, completion-only and assistant-only masks) and hf_ewtune trains it with DP-SGD:
Poisson sampling, one loss per privacy unit clipped in one backward, noise once per step, the certified
accountant, the privacy state in every checkpoint and the guarantee on the model card.

The rule for composing (also for your own subclasses): DP-SGD trains only on
``compute_per_example_loss(model, inputs) -> Tensor[B]``, one loss per privacy unit, each depending on its own
unit only. A subclass that overrides ``compute_loss`` or ``training_step`` without overriding
``compute_per_example_loss`` is refused at construction (:class:`~hf_ewtune.errors.PrivacyConfigError`),
since its loss would never be clipped per example. See docs/trl.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_ewtune.trl.compat import TESTED_TRL, require_trl

_LAZY = {
    "DPSFTTrainer": "hf_ewtune.trl.sft",
    "DPSFTConfig": "hf_ewtune.trl.sft",
    "DPDPOTrainer": "hf_ewtune.trl.dpo",
    "DPDPOConfig": "hf_ewtune.trl.dpo",
}

__all__ = ["TESTED_TRL", "require_trl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_ewtune.trl' has no attribute {name!r}")
