"""Input checks shared by the accountants and calibration (each error names the argument and the fix)."""

from __future__ import annotations

import math
from numbers import Integral, Real

from hf_ewtune.errors import PrivacyConfigError


def check_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as a float if it lies in (0, 1], else raise :class:`PrivacyConfigError`."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Real) or not math.isfinite(sample_rate):
        raise PrivacyConfigError(f"{name} must be a number in (0, 1], got {sample_rate!r}.")
    if not 0.0 < float(sample_rate) <= 1.0:
        raise PrivacyConfigError(
            f"{name} must be in (0, 1] (expected batch size / dataset size), got {sample_rate!r}."
        )
    return float(sample_rate)


def check_noise_multiplier(noise_multiplier: float, *, name: str = "noise_multiplier") -> float:
    """Return ``noise_multiplier`` as a float if it is >= 0 (0 means no privacy: epsilon is infinite)."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, Real) or math.isnan(noise_multiplier):
        raise PrivacyConfigError(f"{name} must be a number >= 0, got {noise_multiplier!r}.")
    if float(noise_multiplier) < 0 or math.isinf(noise_multiplier):
        raise PrivacyConfigError(
            f"{name} must be finite and >= 0 (noise std / clipping norm), got {noise_multiplier!r}."
        )
    return float(noise_multiplier)


def check_delta(delta: float, *, name: str = "delta") -> float:
    """Return ``delta`` as a float if it lies in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, Real) or not math.isfinite(delta):
        raise PrivacyConfigError(f"{name} must be a number in (0, 1), got {delta!r}.")
    if not 0.0 < float(delta) < 1.0:
        raise PrivacyConfigError(
            f"{name} must be in (0, 1) (typically below 1/dataset size, e.g. 1e-5), got {delta!r}."
        )
    return float(delta)


def check_steps(steps: int, *, name: str = "steps", allow_zero: bool = True) -> int:
    """Return ``steps`` as an int if it is a non-negative integer (positive when ``allow_zero`` is False)."""
    if isinstance(steps, bool) or not isinstance(steps, (Integral, float)):
        raise PrivacyConfigError(f"{name} must be a non-negative integer, got {steps!r}.")
    if isinstance(steps, float):
        if not math.isfinite(steps) or steps != int(steps):
            raise PrivacyConfigError(f"{name} must be a whole number of steps, got {steps!r}.")
    steps = int(steps)
    if steps < 0 or (steps == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise PrivacyConfigError(f"{name} must be an integer {bound}, got {steps!r}.")
    return steps


def check_target_epsilon(target_epsilon: float, *, name: str = "target_epsilon") -> float:
    """Return ``target_epsilon`` as a float if it is finite and > 0."""
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, Real) or not math.isfinite(target_epsilon):
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {target_epsilon!r}.")
    if float(target_epsilon) <= 0:
        raise PrivacyConfigError(f"{name} must be > 0, got {target_epsilon!r}.")
    return float(target_epsilon)
