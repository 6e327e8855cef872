"""The value checks of every privacy setting, in one place (each error names the argument and the fix).

``PrivacyArguments``/``DPTrainingArguments``, the accountants, calibration and the clipping engine all call
these functions, so a value is accepted or refused the same way everywhere (``max_grad_norm=True`` is
refused by all of them). The module imports nothing heavy: argument parsing stays fast.

Example:
    >>> from hf_ewtune.checks import check_max_grad_norm
    >>> check_max_grad_norm(0.5)
    0.5
    >>> check_max_grad_norm(True)
    Traceback (most recent call last):
    ...
    hf_ewtune.errors.PrivacyConfigError: max_grad_norm (the per-example clipping norm C) must be a finite number > 0, got True.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, Optional

from hf_ewtune.errors import PrivacyConfigError

#: Per-example clipping styles of :class:`~hf_ewtune.clipping.ClippingEngine`.
CLIPPING_STYLES = ("flat", "per_layer", "automatic")


def is_real(x: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(x, Real) and not isinstance(x, bool)


def check_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as a float if it lies in (0, 1], else raise :class:`PrivacyConfigError`."""
    if not is_real(sample_rate) or not math.isfinite(sample_rate):
        raise PrivacyConfigError(f"{name} must be a number in (0, 1], got {sample_rate!r}.")
    if not 0.0 < float(sample_rate) <= 1.0:
        raise PrivacyConfigError(
            f"{name} must be in (0, 1] (expected batch size / dataset size), got {sample_rate!r}."
        )
    return float(sample_rate)


def check_noise_multiplier(noise_multiplier: float, *, name: str = "noise_multiplier") -> float:
    """Return ``noise_multiplier`` as a float if it is >= 0 (0 means no privacy: epsilon is infinite)."""
    if not is_real(noise_multiplier) or math.isnan(noise_multiplier):
        raise PrivacyConfigError(f"{name} must be a number >= 0, got {noise_multiplier!r}.")
    if float(noise_multiplier) < 0 or math.isinf(noise_multiplier):
        raise PrivacyConfigError(
            f"{name} must be finite and >= 0 (noise std / clipping norm), got {noise_multiplier!r}."
        )
    return float(noise_multiplier)


def check_delta(delta: float, *, name: str = "delta") -> float:
    """Return ``delta`` as a float if it lies in (0, 1)."""
    if not is_real(delta) or not math.isfinite(delta):
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
    if not is_real(target_epsilon) or not math.isfinite(target_epsilon):
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {target_epsilon!r}.")
    if float(target_epsilon) <= 0:
        raise PrivacyConfigError(f"{name} must be > 0, got {target_epsilon!r}.")
    return float(target_epsilon)


def check_max_grad_norm(max_grad_norm: float, *, name: str = "max_grad_norm") -> float:
    """Return the per-example clipping norm C as a float if it is finite and > 0."""
    if not is_real(max_grad_norm) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise PrivacyConfigError(
            f"{name} (the per-example clipping norm C) must be a finite number > 0, got {max_grad_norm!r}."
        )
    return float(max_grad_norm)


def check_choice(value: Any, choices: Iterable[str], *, name: str) -> str:
    """Return ``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise PrivacyConfigError(f"{name} must be one of {options}, got {value!r}.")
    return value


def check_optional_int(value: Any, *, name: str, minimum: Optional[int] = None) -> Optional[int]:
    """Return ``value`` if it is ``None`` or an int (not a bool) that is at least ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise PrivacyConfigError(f"{name} must be an int{bound} or None, got {value!r}.")
    return int(value)


def check_bool(value: Any, *, name: str) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise PrivacyConfigError(f"{name} must be True or False, got {value!r}.")
    return value


def check_privacy_unit(privacy_unit: Any, *, name: str = "privacy_unit") -> str:
    """Return ``privacy_unit`` if it is a one-line description (at most 200 characters) of what one row is."""
    if not isinstance(privacy_unit, str) or not privacy_unit.strip() or len(privacy_unit) > 200 or "\n" in privacy_unit:
        raise PrivacyConfigError(
            f"{name} must be a one-line description of what one training row is (at most 200 characters), "
            f"e.g. 'example' or '1024-token block of the concatenated corpus'; got {privacy_unit!r}."
        )
    return privacy_unit


#: The privacy unit of user-level DP (``PrivacyArguments.user_id_column`` set).
USER_UNIT = "user"


def check_user_arguments(user_id_column: Any, max_examples_per_user: Any, privacy_unit: Any) -> None:
    """Value checks of the user-level fields (``PrivacyArguments`` runs them while parsing).

    Raises:
        PrivacyConfigError: naming the field and the fix.
    """
    if user_id_column is not None and (not isinstance(user_id_column, str) or not user_id_column.strip()):
        raise PrivacyConfigError(
            f"user_id_column must be the name of the train_dataset column holding each row's user id, or None "
            f"(example-level privacy); got {user_id_column!r}.")
    if max_examples_per_user is not None:
        if isinstance(max_examples_per_user, bool) or not isinstance(max_examples_per_user, int) or max_examples_per_user < 1:
            raise PrivacyConfigError(
                f"max_examples_per_user must be an int >= 1 (the most rows of one sampled user used per step) or "
                f"None (all of a user's rows); got {max_examples_per_user!r}.")
        if user_id_column is None:
            raise PrivacyConfigError(
                f"max_examples_per_user={max_examples_per_user} needs user_id_column (user-level privacy): set "
                "user_id_column to the column holding each row's user id, or leave max_examples_per_user unset.")
    if user_id_column is None and isinstance(privacy_unit, str) and " ".join(privacy_unit.split()).lower() == USER_UNIT:
        raise PrivacyConfigError(
            f"privacy_unit={privacy_unit!r} would state user-level privacy (all of a user's rows clipped together) on "
            "the card, but without user_id_column every row is clipped and sampled on its own, so a user with "
            "several rows is protected only as a group. Set user_id_column to the column holding each row's user "
            "id (user-level DP), or leave privacy_unit at 'example' / describe what one row is.")
    if user_id_column is not None and isinstance(privacy_unit, str) and privacy_unit.strip() not in ("example", USER_UNIT):
        raise PrivacyConfigError(
            f"user_id_column={user_id_column!r} makes the privacy unit a user, but privacy_unit={privacy_unit!r} says "
            "a training row is part of a record (e.g. a block cut across records by group_texts): such a row can "
            "mix several users, so user-level clipping would not bound one user's influence. Give every row "
            f"exactly one user (tokenize per record) and leave privacy_unit at 'example' (or set it to '{USER_UNIT}').")
