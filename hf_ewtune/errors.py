"""Exceptions raised by hf_ewtune. Every message names the offending argument and the fix."""

from __future__ import annotations


class PrivacyConfigError(ValueError):
    """A privacy setting is invalid or inconsistent (raised before any training starts)."""


class BudgetExhaustedError(PrivacyConfigError):
    """The privacy budget is already spent, or the planned run cannot fit in it."""


class UnsupportedModuleError(PrivacyConfigError):
    """The model contains a trainable module whose per-example gradients cannot be computed privately
    (or a module such as BatchNorm that mixes examples)."""


class PrivacyStateError(RuntimeError):
    """A checkpoint or output folder lacks (or has a corrupt) privacy state."""


class UnsafeUploadError(RuntimeError):
    """An upload to the Hub would include the privacy state or non-private training logs; nothing was uploaded."""
