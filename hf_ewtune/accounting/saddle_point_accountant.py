"""SaddlePointAccountant: the saddle-point accountant's certified bound, with a certified fallback."""

from __future__ import annotations

import math
from typing import Any

from hf_ewtune.errors import PrivacyConfigError

from ._validation import check_delta
from .base import Accountant
from .certified import DEFAULT_VDI, pld_description, pld_epsilon, rdp_description, rdp_epsilon
from .saddle_point import spa_epsilon
from .saddle_point_bound import BOUND_DESCRIPTION, spa_bound

FALLBACKS = ("pld", "rdp", "none")


class SaddlePointAccountant(Accountant):
    """Saddle-point accountant (Alghamdi et al., ICML 2023): constant-time in the number of steps.

    :meth:`get_epsilon` is CERTIFIED: the smallest of the certified values computed, namely the
    saddle-point upper bound (tilted Berry-Esseen, :func:`.saddle_point_bound.spa_bound`) and, where
    that bound is not within ``tolerance`` of the SPA-CLT estimate (a loose or vacuous bound) or
    ``always_fallback`` is set, the ``fallback`` accountant's epsilon (dp-accounting PLD by default, or
    RDP). :meth:`certified_by_for` names what certified it. :meth:`estimate_epsilon` is the SPA-CLT (or
    SPA-MSD) point estimate: NOT a guarantee (it only decides when the fallback is worth its cost; every
    published value is certified whatever it decides).

    The bound is tight (within ~1% of PLD) when every example is expected to be sampled many times
    (``q * steps`` in the hundreds); when ``q * steps`` is small the tilted privacy loss is far from
    Gaussian and the bound is loose (see docs/accounting.md): there the fallback is computed.

    Args:
        fallback: ``"pld"`` (default), ``"rdp"`` or ``"none"`` (then the bound is always published, ``inf``
            where it is vacuous).
        tolerance: compute the fallback when ``bound > (1 + tolerance) * estimate`` (default 0.01).
        always_fallback: always compute the fallback too and publish the smaller.
        value_discretization_interval: PLD grid of the fallback.

    Example:
        >>> acc = SaddlePointAccountant(tolerance=0.05)
        >>> acc.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=3000)
        >>> round(acc.estimate_epsilon(delta=1e-5), 3)   # SPA-CLT estimate (PLD: 1.1196)
        1.12
        >>> round(acc.get_epsilon(delta=1e-5), 3)        # certified: the saddle-point upper bound
        1.132
        >>> acc.certified_by_for(1e-5).startswith("saddle-point accountant upper bound")
        True
    """

    name = "saddle_point"

    def __init__(
        self,
        *,
        fallback: str = "pld",
        tolerance: float = 0.01,
        always_fallback: bool = False,
        value_discretization_interval: float = DEFAULT_VDI,
    ) -> None:
        super().__init__()
        if fallback not in FALLBACKS:
            raise PrivacyConfigError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < math.inf:
            raise PrivacyConfigError(f"tolerance must be a finite number >= 0 (e.g. 0.01), got {tolerance!r}.")
        if not isinstance(always_fallback, bool):
            raise PrivacyConfigError(f"always_fallback must be True or False, got {always_fallback!r}.")
        if not value_discretization_interval > 0:
            raise PrivacyConfigError(
                f"value_discretization_interval must be > 0, got {value_discretization_interval!r}."
            )
        self.fallback = fallback
        self.tolerance = float(tolerance)
        self.always_fallback = always_fallback
        self.value_discretization_interval = float(value_discretization_interval)

    def options(self) -> dict[str, Any]:
        return {
            "fallback": self.fallback,
            "tolerance": self.tolerance,
            "always_fallback": self.always_fallback,
            "value_discretization_interval": self.value_discretization_interval,
        }

    @property
    def certified_by(self) -> str:
        return BOUND_DESCRIPTION

    def _fallback_description(self) -> str:
        if self.fallback == "rdp":
            return rdp_description()
        return pld_description(self.value_discretization_interval)

    def _fallback_epsilon(self, history, delta: float) -> float:
        if self.fallback == "rdp":
            return rdp_epsilon(history, delta)
        if self.fallback == "pld":
            return pld_epsilon(history, delta, value_discretization_interval=self.value_discretization_interval)
        return math.inf

    def _decide(self, history, delta: float) -> tuple[float, str]:
        key = ("decision", history, delta)
        if key not in self._cache:
            bound = spa_bound(history, delta).epsilon
            choice = (float(bound), BOUND_DESCRIPTION)
            estimate = self._estimate(history, delta, "clt")
            # an infinite estimate (saddle point out of range) says nothing about the bound: compute the fallback
            loose = not (math.isfinite(estimate) and bound <= (1.0 + self.tolerance) * estimate)
            if self.fallback != "none" and (self.always_fallback or loose):
                other = float(self._fallback_epsilon(history, delta))
                if other < choice[0]:
                    choice = (other, self._fallback_description())
            self._cache[key] = choice
        return self._cache[key]

    def _certified_epsilon(self, history, delta):
        return self._decide(history, delta)[0]

    def _certified_by_for(self, history, delta: float) -> str:
        if not history or any(s == 0.0 for s, _, _ in history):
            return self.certified_by
        return self._decide(history, delta)[1]

    def certified_by_for(self, delta: float = 1e-5) -> str:
        """What certified :meth:`get_epsilon` at ``delta`` for the current history."""
        return self._certified_by_for(tuple(self._history), check_delta(delta))

    def upper_bound(self, delta: float = 1e-5) -> float:
        """The saddle-point upper bound alone (``inf`` where it is vacuous)."""
        delta = check_delta(delta)
        history = tuple(self._history)
        if not history:
            return 0.0
        return float(spa_bound(history, delta).epsilon)

    def estimate_epsilon(self, delta: float = 1e-5, *, method: str = "clt") -> float:
        """Saddle-point ESTIMATE of epsilon (``"clt"``: SPA-CLT, ``"msd"``: SPA-MSD); NOT a guarantee."""
        if method not in ("clt", "msd"):
            raise PrivacyConfigError(f"method must be 'clt' or 'msd', got {method!r}.")
        return self._estimate(tuple(self._history), check_delta(delta), method)

    def _estimate(self, history, delta: float, method: str) -> float:
        key = ("estimate", history, delta, method)
        if key not in self._cache:
            self._cache[key] = float(spa_epsilon(history, delta, method=method))
        return self._cache[key]
