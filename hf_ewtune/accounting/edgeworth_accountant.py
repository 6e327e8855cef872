"""EdgeworthAccountant: EW-Tune's Edgeworth estimate, reported beside a certified epsilon."""

from __future__ import annotations

from typing import Any, Sequence

from hf_ewtune.errors import PrivacyConfigError

from .base import Accountant
from .certified import DEFAULT_VDI, coarse_pld_epsilon, pld_description, pld_epsilon, rdp_description, rdp_epsilon
from .saddle_point_bound import BOUND_DESCRIPTION as SPA_DESCRIPTION
from .saddle_point_bound import spa_bound
from .edgeworth_report import (  # noqa: F401 - re-exported (they lived here before)
    edgeworth_epsilons,
    edgeworth_error_bound,
    edgeworth_interval,
    edgeworth_summary,
)

BOUND_DESCRIPTION = (
    "Edgeworth order-1 expansion + explicit uniform error bound "
    "(Derumigny-Girard-Guyonvarch 2023, iid, no continuity assumption)"
)


class EdgeworthAccountant(Accountant):
    """Edgeworth accountant (EW-Tune) whose *published* epsilon is certified.

    :meth:`estimate_epsilon` is the Edgeworth point estimate (order 1 by default, EW-Tune's choice):
    fast (a few ms, independent of the number of steps) but NOT a guarantee; it under-states epsilon
    in the regime of fine-tuning. :meth:`get_epsilon` returns a certified upper bound: the certifier's
    epsilon (dp-accounting PLD by default, or RDP), or the Edgeworth upper bound from the explicit
    uniform error bound when that is certifiable (Delta_Y < delta) and smaller. With
    ``certifiers=("pld", "saddle_point")`` the saddle-point upper bound (Alghamdi et al. 2023, every numerical
    input with a proven error radius; tens of milliseconds for any number of steps) is computed too, and the
    published epsilon is the smallest of the certified values computed, labelled with what certified it
    (``get_privacy_spent().certified_by``).

    Args:
        order: order of the Edgeworth estimate (1 or 2).
        certifier: ``"pld"`` (default) or ``"rdp"``.
        value_discretization_interval: PLD grid (1e-4 by default).
        certifiers: all certifiers to compute: exactly one of ``"pld"`` / ``"rdp"`` (it replaces ``certifier``),
            optionally with ``"saddle_point"``. Default: ``(certifier,)``.

    Example:
        >>> acc = EdgeworthAccountant(order=1)
        >>> acc.step(noise_multiplier=0.7865, sample_rate=0.029696, num_steps=660)
        >>> round(acc.estimate_epsilon(delta=1e-5), 3)   # EW-Tune's number: an estimate
        7.993
        >>> round(acc.get_epsilon(delta=1e-5), 2)        # certified (PLD)
        8.29
    """

    name = "edgeworth"
    edgeworth_based = True

    def __init__(
        self,
        order: int = 1,
        *,
        certifier: str = "pld",
        value_discretization_interval: float = DEFAULT_VDI,
        certifiers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if order not in (1, 2):
            raise PrivacyConfigError(f"order must be 1 or 2 (EW-Tune uses 1), got {order!r}.")
        if certifier not in ("pld", "rdp"):
            raise PrivacyConfigError(f"certifier must be 'pld' or 'rdp', got {certifier!r}.")
        self.certifiers = _check_certifiers((certifier,) if certifiers is None else certifiers)
        certifier = next(c for c in self.certifiers if c in ("pld", "rdp"))
        if not value_discretization_interval > 0:
            raise PrivacyConfigError(
                f"value_discretization_interval must be > 0, got {value_discretization_interval!r}."
            )
        self.order = int(order)
        self.certifier = certifier
        self.value_discretization_interval = float(value_discretization_interval)

    def options(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "certifier": self.certifier,
            "value_discretization_interval": self.value_discretization_interval,
            "certifiers": list(self.certifiers),
        }

    @property
    def certifier_label(self) -> str:
        return "RDP" if self.certifier == "rdp" else "PLD"

    def search_epsilon_fn(self):
        return coarse_pld_epsilon if self.certifier == "pld" else None

    @property
    def certified_by(self) -> str:
        if self.certifier == "rdp":
            return rdp_description()
        return pld_description(self.value_discretization_interval)

    def estimate_epsilon(self, delta: float = 1e-5, *, order: int | None = None) -> float:
        """Edgeworth point estimate of epsilon (an estimate, NOT a guarantee)."""
        from ._validation import check_delta

        delta = check_delta(delta)
        order = self.order if order is None else order
        history = tuple(self._history)
        key = ("estimate", history, delta, order)
        if key not in self._cache:
            summary = edgeworth_summary(history, delta)
            o1, o2 = summary["order1"], summary["order2"]
            self._cache[("estimate", history, delta, 1)] = o1
            self._cache[("estimate", history, delta, 2)] = o2
        return self._cache[key]

    def _certifier_epsilon(self, history, delta: float) -> float:
        if self.certifier == "rdp":
            return rdp_epsilon(history, delta)
        out: dict[str, str] = {}
        eps = pld_epsilon(history, delta, value_discretization_interval=self.value_discretization_interval, label_out=out)
        self._cache[("label", history, delta)] = out.get("certified_by", self.certified_by)
        return eps

    def _bound(self, history, delta: float) -> dict[str, Any]:
        key = ("bound", history, delta)
        if key not in self._cache:
            self._cache[key] = edgeworth_summary(history, delta)["bound"]
        return self._cache[key]

    def _candidates(self, history, delta: float) -> list[tuple[float, str]]:
        """Every certified ``(epsilon, certified_by)`` computed for this history, the first certifier's first."""
        key = ("candidates", history, delta)
        if key not in self._cache:
            eps = self._certifier_epsilon(history, delta)
            found = [(float(eps), super()._certified_by_for(history, delta))]
            bound = self._bound(history, delta)
            if bound["certified"]:
                found.append((float(bound["epsilon_upper"]), BOUND_DESCRIPTION))
            if "saddle_point" in self.certifiers:
                found.append((float(spa_bound(history, delta).epsilon), SPA_DESCRIPTION))
            self._cache[key] = found
        return self._cache[key]

    def _certified_epsilon(self, history, delta):
        return min(eps for eps, _ in self._candidates(history, delta))

    def _certified_by_for(self, history, delta: float) -> str:
        if history and not any(s == 0.0 for s, _, _ in history):
            best = min(eps for eps, _ in self._candidates(history, delta))
            return next(label for eps, label in self._candidates(history, delta) if eps == best)  # first certifier wins ties
        return super()._certified_by_for(history, delta)


def _check_certifiers(certifiers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(certifiers, str) or not isinstance(certifiers, (list, tuple)):
        raise PrivacyConfigError(
            f"certifiers must be a tuple such as ('pld', 'saddle_point'), got {certifiers!r}.")
    out = tuple(certifiers)
    primary = [c for c in out if c in ("pld", "rdp")]
    unknown = [c for c in out if c not in ("pld", "rdp", "saddle_point")]
    if unknown or len(primary) != 1 or len(set(out)) != len(out):
        raise PrivacyConfigError(
            f"certifiers must hold exactly one of 'pld' / 'rdp', optionally with 'saddle_point' (no repeats), got "
            f"{certifiers!r}; e.g. certifiers=('pld', 'saddle_point').")
    return out
