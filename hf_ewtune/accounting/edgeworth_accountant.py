"""EdgeworthAccountant: EW-Tune's Edgeworth estimate, reported beside a certified epsilon."""

from __future__ import annotations

from typing import Any

from hf_ewtune.errors import PrivacyConfigError

from .base import Accountant
from .certified import DEFAULT_VDI, coarse_pld_epsilon, pld_description, pld_epsilon, rdp_description, rdp_epsilon
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
    uniform error bound when that is certifiable (Delta_Y < delta) and smaller.

    Args:
        order: order of the Edgeworth estimate (1 or 2).
        certifier: ``"pld"`` (default) or ``"rdp"``.
        value_discretization_interval: PLD grid (1e-4 by default).

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

    def __init__(self, order: int = 1, *, certifier: str = "pld", value_discretization_interval: float = DEFAULT_VDI) -> None:
        super().__init__()
        if order not in (1, 2):
            raise PrivacyConfigError(f"order must be 1 or 2 (EW-Tune uses 1), got {order!r}.")
        if certifier not in ("pld", "rdp"):
            raise PrivacyConfigError(f"certifier must be 'pld' or 'rdp', got {certifier!r}.")
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

    def _certified_epsilon(self, history, delta):
        eps = self._certifier_epsilon(history, delta)
        bound = self._bound(history, delta)
        if bound["certified"] and bound["epsilon_upper"] < eps:
            return bound["epsilon_upper"]
        return eps

    def _certified_by_for(self, history, delta: float) -> str:
        if history and not any(s == 0.0 for s, _, _ in history):
            bound = self._bound(history, delta)
            if bound["certified"] and bound["epsilon_upper"] <= self.get_epsilon(delta):
                return BOUND_DESCRIPTION
        return super()._certified_by_for(history, delta)
