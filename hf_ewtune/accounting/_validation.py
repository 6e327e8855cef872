"""Input checks shared by the accountants and calibration: the ones of :mod:`hf_ewtune.checks` (one definition),
plus the ranges every accountant query supports.

Every accountant query must finish in bounded time and memory, so the inputs are limited to the ranges
below (outside them the certified computation either blows up or gives no meaningful guarantee):

* ``noise_multiplier``: 0 (no privacy: epsilon is infinite) or in [:data:`NOISE_MULTIPLIER_MIN`,
  :data:`NOISE_MULTIPLIER_MAX`];
* ``sample_rate``: in [:data:`SAMPLE_RATE_MIN`, 1];
* ``steps``: at most :data:`MAX_STEPS` (per call and in total);
* ``delta``: in [:data:`DELTA_MIN`, 1);
* ``target_epsilon``: in (0, :data:`TARGET_EPSILON_MAX`].
"""

from __future__ import annotations

from hf_ewtune import checks as _checks
from hf_ewtune.errors import PrivacyConfigError

#: Below this noise multiplier a single step's privacy loss is beyond any meaningful epsilon (and the PLD
#: grid would need billions of points); use 0 for a non-private debugging run.
NOISE_MULTIPLIER_MIN = 1e-2
#: Above this the noise dwarfs any gradient (and sigma^2 overflows in the accountants).
NOISE_MULTIPLIER_MAX = 1e6
#: Smallest sampling rate accepted (a batch of 1 out of a billion examples).
SAMPLE_RATE_MIN = 1e-9
#: Largest number of steps accepted, per call and in total.
MAX_STEPS = 10**9
#: Smallest delta accepted.
DELTA_MIN = 1e-30
#: Largest target epsilon accepted (e^100 is no guarantee; calibrating for more would need tiny noise).
TARGET_EPSILON_MAX = 100.0


def check_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> float:
    """:func:`hf_ewtune.checks.check_sample_rate`, and at least :data:`SAMPLE_RATE_MIN`."""
    q = _checks.check_sample_rate(sample_rate, name=name)
    if q < SAMPLE_RATE_MIN:
        raise PrivacyConfigError(
            f"{name}={sample_rate!r} is below the supported range [{SAMPLE_RATE_MIN:g}, 1] (expected batch size / "
            "dataset size): use a larger batch."
        )
    return q


def check_noise_multiplier(noise_multiplier: float, *, name: str = "noise_multiplier") -> float:
    """:func:`hf_ewtune.checks.check_noise_multiplier`, and 0 or in [NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX]."""
    sigma = _checks.check_noise_multiplier(noise_multiplier, name=name)
    if sigma != 0.0 and not NOISE_MULTIPLIER_MIN <= sigma <= NOISE_MULTIPLIER_MAX:
        raise PrivacyConfigError(
            f"{name}={noise_multiplier!r} is outside the supported range: 0 (no privacy, debugging only) or "
            f"[{NOISE_MULTIPLIER_MIN:g}, {NOISE_MULTIPLIER_MAX:g}] (below {NOISE_MULTIPLIER_MIN:g} no meaningful "
            "epsilon exists and the certified accounting cannot be computed in bounded memory; above "
            f"{NOISE_MULTIPLIER_MAX:g} the noise overflows)."
        )
    return sigma


def check_delta(delta: float, *, name: str = "delta") -> float:
    """:func:`hf_ewtune.checks.check_delta`, and at least :data:`DELTA_MIN`."""
    value = _checks.check_delta(delta, name=name)
    if value < DELTA_MIN:
        raise PrivacyConfigError(f"{name}={delta!r} is below the supported range [{DELTA_MIN:g}, 1).")
    return value


def check_steps(steps: int, *, name: str = "steps", allow_zero: bool = True) -> int:
    """:func:`hf_ewtune.checks.check_steps`, and at most :data:`MAX_STEPS`."""
    value = _checks.check_steps(steps, name=name, allow_zero=allow_zero)
    if value > MAX_STEPS:
        raise PrivacyConfigError(
            f"{name}={steps!r} is above the supported maximum of {MAX_STEPS:.0e} steps; no DP-SGD run is that long "
            "(check the step count or the units)."
        )
    return value


def check_target_epsilon(target_epsilon: float, *, name: str = "target_epsilon") -> float:
    """:func:`hf_ewtune.checks.check_target_epsilon`, and at most :data:`TARGET_EPSILON_MAX`."""
    value = _checks.check_target_epsilon(target_epsilon, name=name)
    if value > TARGET_EPSILON_MAX:
        raise PrivacyConfigError(
            f"{name}={target_epsilon!r} is above the supported range (0, {TARGET_EPSILON_MAX:g}]: an epsilon that "
            f"large is no meaningful guarantee (e^{TARGET_EPSILON_MAX:g}), and calibrating for it would need noise "
            "too small to account for. Use a smaller target_epsilon, or set noise_multiplier without a target."
        )
    return value


def check_accountable(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, target_epsilon: float | None = None
) -> None:
    """Raise :class:`PrivacyConfigError` unless the run can be accounted (every value in its supported range).

    DPTrainer calls this before training, so that nothing accounted after training can fail.

    Example:
        >>> check_accountable(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
        >>> check_accountable(noise_multiplier=1e-3, sample_rate=0.01, steps=1000, delta=1e-5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_ewtune.errors.PrivacyConfigError: noise_multiplier=0.001 is outside the supported range: ...
    """
    check_noise_multiplier(noise_multiplier)
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_delta(delta)
    if target_epsilon is not None:
        check_target_epsilon(target_epsilon)
