"""``DPSettings``: the one frozen record of sigma, q, the expected batch size, C and delta of a DP run.

The optimizer (:class:`~hf_ewtune.noise.DPOptimizer`, which adds the noise) and the accountant's callback
(:class:`~hf_ewtune.callbacks.PrivacyCallback`, which composes the same sigma and q) read the SAME
``DPSettings`` object; it is immutable, and ``DPTrainer.noise_multiplier`` / ``sample_rate`` /
``expected_batch_size`` / ``delta`` are read-only views of it. So the noise added and the noise accounted
cannot drift apart after set-up: assigning any of them raises
:class:`~hf_ewtune.errors.PrivacyConfigError`.

Example:
    >>> s = DPSettings(noise_multiplier=1.0, sample_rate=0.25, expected_batch_size=8, max_grad_norm=1.0,
    ...                sensitivity=1.0, delta=1e-5)
    >>> s.noise_std
    1.0
    >>> s.noise_multiplier = 0.0  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dataclasses.FrozenInstanceError: cannot assign to field 'noise_multiplier'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hf_ewtune.checks import check_delta, check_max_grad_norm, check_noise_multiplier, check_sample_rate, is_real
from hf_ewtune.errors import PrivacyConfigError


@dataclass(frozen=True)
class DPSettings:
    """What every DP-SGD step uses, fixed at set-up.

    Attributes:
        noise_multiplier: sigma (>= 0): the noise std is ``sigma * sensitivity``.
        sensitivity: L2 sensitivity of one example's clipped contribution (``C`` for all clipping styles).
        expected_batch_size: the public constant ``q N`` the noisy sum is divided by (> 0).
        sample_rate: Poisson sampling rate q in (0, 1] (``None`` for a stand-alone optimizer).
        max_grad_norm: the clipping norm C (``None`` for a stand-alone optimizer).
        delta: delta of the reported (epsilon, delta) (``None`` for a stand-alone optimizer).
    """

    noise_multiplier: float
    sensitivity: float
    expected_batch_size: float
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        def optional(check: Any, value: Any, name: str) -> Any:
            return None if value is None else check(value, name=name)

        expected = self.expected_batch_size
        if not is_real(expected) or not math.isfinite(expected) or expected <= 0:
            raise PrivacyConfigError(f"expected_batch_size must be a finite number > 0, got {expected!r}.")
        checked = {
            "noise_multiplier": check_noise_multiplier(self.noise_multiplier),
            "sensitivity": check_max_grad_norm(self.sensitivity, name="sensitivity"),
            "expected_batch_size": float(expected),
            "sample_rate": optional(check_sample_rate, self.sample_rate, "sample_rate"),
            "max_grad_norm": optional(check_max_grad_norm, self.max_grad_norm, "max_grad_norm"),
            "delta": optional(check_delta, self.delta, "delta"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to the summed clipped gradients."""
        return self.noise_multiplier * self.sensitivity


def read_only_setting(name: str, *, holder: str = "_dp_settings", owner: str = "DPTrainer",
                      draft_until_frozen: bool = False) -> property:
    """A property reading ``<holder>.<name>`` whose setter raises :class:`PrivacyConfigError`.

    With ``draft_until_frozen`` (``DPTrainer``), assignments are kept in a private draft while ``holder``
    is not set yet (the set-up steps compute sigma, q, ... one by one); once the frozen settings exist the
    property reads them and assigning raises.
    """

    def fget(self: Any) -> Any:
        settings = self.__dict__.get(holder)
        if settings is not None:
            return getattr(settings, name)
        draft = self.__dict__.get("_dp_settings_draft", {})
        if name in draft:
            return draft[name]
        raise AttributeError(f"{owner}.{name} is not set yet (the privacy set-up has not computed it).")

    def fset(self: Any, value: Any) -> None:
        if draft_until_frozen and self.__dict__.get(holder) is None:
            self.__dict__.setdefault("_dp_settings_draft", {})[name] = value
            return
        raise PrivacyConfigError(
            f"{owner}.{name} is read-only after set-up (got an assignment of {value!r}): the noise the optimizer "
            "adds and the sigma/q the accountant composes are read from one frozen DPSettings, so that they "
            f"cannot drift apart. Build a new {owner} with the {name} you want instead."
        )

    return property(fget, fset, doc=f"``{name}`` of the run's frozen :class:`DPSettings` (read-only after set-up).")


__all__ = ["DPSettings", "read_only_setting"]


class HoldsDPSettings:
    """Mixin for the objects that read one frozen :class:`DPSettings` (the optimizer and the accountant's callback).

    Subclasses store it in ``self._settings`` and expose its fields with :func:`read_only_setting`.
    """

    _settings: DPSettings

    @property
    def settings(self) -> DPSettings:
        """The frozen settings shared by the optimizer and the accountant (read-only)."""
        return self._settings

