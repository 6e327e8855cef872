"""Thin adapters over dp-accounting's certified accountants (PLD, RDP). Nothing is re-implemented here."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

from . import pld_budget
from .base import Accountant

DEFAULT_VDI = 1e-4
COARSE_VDI = 1e-3  # searches only (calibration, steps within budget); never published


@lru_cache(maxsize=1)
def dp_accounting_version() -> str:
    """Installed dp-accounting version (e.g. ``"0.6.0"``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def dp_event(history: Sequence[Sequence[float]]):
    """DpEvent for segments ``(noise_multiplier, sample_rate, num_steps)``.

    Each segment is ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), n)``;
    segments are composed with ``ComposedDpEvent``.
    """
    import dp_accounting

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))), int(n)
        )
        for sigma, q, n in history
        if int(n) > 0
    ]
    if len(events) == 1:
        return events[0]
    return dp_accounting.ComposedDpEvent(events)


def pld_epsilon(
    history: Sequence[Sequence[float]],
    delta: float,
    *,
    value_discretization_interval: float = DEFAULT_VDI,
    label_out: dict[str, str] | None = None,
) -> float:
    """Certified epsilon from dp-accounting's PLD accountant (pessimistic, add-or-remove-one), bounded in time
    and memory: a coarser grid or the RDP bound where the PLD grid would be too large (see :mod:`.pld_budget`).

    ``label_out``, if given, receives ``"certified_by"``: what certified the returned number.
    """
    if not history:
        return 0.0
    if any(float(s) == 0.0 for s, _, n in history if int(n) > 0):
        return math.inf
    eps, label = certified_pld_epsilon(history, delta, value_discretization_interval=value_discretization_interval)
    if label_out is not None:
        label_out["certified_by"] = label
    return eps


def pld_epsilon_unbounded(
    history: Sequence[Sequence[float]], delta: float, *, value_discretization_interval: float = DEFAULT_VDI
) -> float:
    """dp-accounting's PLD epsilon at exactly this discretization, however large the grid (use :func:`pld_epsilon`)."""
    if not history:
        return 0.0
    if any(float(s) == 0.0 for s, _, n in history if int(n) > 0):
        return math.inf
    from dp_accounting.pld import PLDAccountant as _PLD
    from dp_accounting import NeighboringRelation

    acc = _PLD(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=value_discretization_interval,
    )
    acc.compose(dp_event(history))
    return float(acc.get_epsilon(delta))


def rdp_epsilon(history: Sequence[Sequence[float]], delta: float, *, orders: Sequence[float] | None = None) -> float:
    """Certified epsilon from dp-accounting's RDP accountant (add-or-remove-one)."""
    if not history:
        return 0.0
    if any(float(s) == 0.0 for s, _, n in history if int(n) > 0):
        return math.inf
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=list(orders) if orders is not None else None)
    acc.compose(dp_event(history))
    return float(acc.get_epsilon(delta))


def _short(value: float) -> str:
    """``1e-4`` rather than ``0.0001`` for powers of ten."""
    exponent = round(math.log10(value))
    return f"1e{exponent}" if math.isclose(value, 10.0**exponent, rel_tol=1e-12) else f"{value:g}"


def pld_description(value_discretization_interval: float = DEFAULT_VDI) -> str:
    return (
        f"dp-accounting {dp_accounting_version()} PLD (pessimistic, add-or-remove-one, "
        f"value discretization {_short(value_discretization_interval)})"
    )


def rdp_description(orders: Sequence[float] | None = None) -> str:
    which = "default orders" if orders is None else f"{len(orders)} orders"
    return f"dp-accounting {dp_accounting_version()} RDP (add-or-remove-one, {which})"


class PLDAccountant(Accountant):
    """Certified accountant: dp-accounting's privacy-loss-distribution accountant.

    Pessimistic estimate, add-or-remove-one adjacency, ``value_discretization_interval`` 1e-4 by
    default (a coarser interval is still an upper bound, only looser). About 0.4-0.7 s per query
    (cached while the history is unchanged).

    Example:
        >>> acc = PLDAccountant()
        >>> acc.step(noise_multiplier=0.7865, sample_rate=0.029696, num_steps=660)
        >>> round(acc.get_epsilon(delta=1e-5), 2)
        8.29
    """

    name = "pld"
    certifier_label = "PLD"

    def search_epsilon_fn(self):
        """PLD on the coarse grid ``COARSE_VDI`` (an upper bound too, looser and ~10x faster)."""
        return coarse_pld_epsilon

    def __init__(self, *, value_discretization_interval: float = DEFAULT_VDI) -> None:
        super().__init__()
        if not value_discretization_interval > 0:
            from hf_ewtune.errors import PrivacyConfigError

            raise PrivacyConfigError(
                f"value_discretization_interval must be > 0, got {value_discretization_interval!r}."
            )
        self.value_discretization_interval = float(value_discretization_interval)

    def options(self) -> dict[str, Any]:
        return {"value_discretization_interval": self.value_discretization_interval}

    @property
    def certified_by(self) -> str:
        return pld_description(self.value_discretization_interval)

    def _certified_epsilon(self, history, delta):
        out: dict[str, str] = {}
        eps = pld_epsilon(history, delta, value_discretization_interval=self.value_discretization_interval, label_out=out)
        self._cache[("label", history, delta)] = out.get("certified_by", self.certified_by)
        return eps


def coarse_pld_epsilon(history, delta: float) -> float:
    """PLD epsilon on the coarse grid :data:`COARSE_VDI` (searches only; the published one uses 1e-4)."""
    return pld_epsilon(history, delta, value_discretization_interval=COARSE_VDI)


class RDPAccountant(Accountant):
    """Certified accountant: dp-accounting's Rényi-DP accountant (valid, but looser than PLD).

    Example:
        >>> acc = RDPAccountant()
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
        >>> round(acc.get_epsilon(delta=1e-5), 3)
        2.101
    """

    name = "rdp"
    certifier_label = "RDP"

    def __init__(self, *, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self.orders = None if orders is None else [float(o) for o in orders]

    def options(self) -> dict[str, Any]:
        return {"orders": self.orders}

    @property
    def certified_by(self) -> str:
        return rdp_description(self.orders)

    def _certified_epsilon(self, history, delta):
        return rdp_epsilon(history, delta, orders=self.orders)


def certified_pld_epsilon(
    history: Sequence[Sequence[float]], delta: float, *, value_discretization_interval: float = 1e-4
) -> tuple[float, str]:
    """Certified epsilon and what certified it, in bounded time and memory (see the module docstring).

    Args:
        history: segments ``(noise_multiplier, sample_rate, num_steps)`` (validated by the caller).
        delta: target delta.
        value_discretization_interval: the PLD grid wanted (used whenever it fits the budget).

    Returns:
        ``(epsilon, certified_by)``.
    """
    vdi = float(value_discretization_interval)
    steps = sum(int(n) for _, _, n in history)
    points = pld_budget.pld_grid_points(history, vdi)
    if points <= pld_budget.POINTS_MAX and steps <= pld_budget.MAX_PLD_STEPS:
        return pld_epsilon_unbounded(history, delta, value_discretization_interval=vdi), pld_description(vdi)
    if steps > pld_budget.MAX_PLD_STEPS:
        why = f"PLD is used for at most {pld_budget.MAX_PLD_STEPS:.0e} steps, this history has {steps:.2e}"
    else:
        why = f"PLD at value discretization {vdi:g} would need ~{points:.1e} grid points, above the {pld_budget.POINTS_MAX:.0e} budget"
    rdp = float(rdp_epsilon(history, delta))
    best = (rdp, f"{rdp_description()}; fallback: {why}")
    coarse = pld_budget._ceil_1sig(vdi * points / pld_budget.POINTS_MAX)
    if coarse <= pld_budget.VDI_MAX and steps <= pld_budget.MAX_PLD_STEPS:
        eps = float(pld_epsilon_unbounded(history, delta, value_discretization_interval=coarse))
        if eps <= rdp:
            best = (eps, f"{pld_description(coarse)}; coarser grid: {why}")
    return best
