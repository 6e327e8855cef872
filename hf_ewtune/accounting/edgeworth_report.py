"""The Edgeworth numbers of a privacy report: order-1/order-2 estimates, the uniform error bound and its interval.

They depend on the history only (not on any accountant class), so every accountant's report shows them and
:class:`~hf_ewtune.accounting.base.Accountant` needs no knowledge of :class:`EdgeworthAccountant`.

Example:
    >>> s = edgeworth_summary(((1.0, 0.01, 1000),), 1e-5)
    >>> round(s["order1"], 2), s["bound"]["certified"]
    (1.89, False)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import brentq

from .cumulants import step_cumulants
from .edgeworth import EPS_GRID, SumCumulants, epsilon_estimate, sum_cumulants, survival
from .error_bound import uniform_error_bound


def edgeworth_epsilons(history, delta: float) -> tuple[float, float]:
    """Order-1 and order-2 Edgeworth point estimates (``inf`` if any step has no noise)."""
    if not history:
        return 0.0, 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf, math.inf
    sums = sum_cumulants(history)
    return epsilon_estimate(delta, sums, order=1), epsilon_estimate(delta, sums, order=2)


def _smallest_eps_at_most(func, values: np.ndarray) -> float:
    """Smallest grid epsilon with ``func <= 0`` refined by brentq in the preceding cell; ``inf`` if none."""
    ok = values <= 0
    if not ok.any():
        return math.inf
    i = int(np.argmax(ok))
    if i == 0:
        return 0.0
    return float(brentq(func, float(EPS_GRID[i - 1]), float(EPS_GRID[i]), xtol=1e-12))


def edgeworth_interval(sums: SumCumulants, delta: float, delta_x: float, delta_y: float) -> tuple[float, float]:
    """``(epsilon_lower, epsilon_upper)`` implied by the uniform bounds ``delta_x``, ``delta_y`` (order 1).

    ``delta_upper(e) = min(1, S_Y + Dy) - e^e max(0, S_X - Dx)`` bounds the true delta from above, so the
    smallest ``e`` with ``delta_upper(e) <= delta`` is a valid epsilon; ``delta_lower`` likewise gives
    the largest ``e`` the true curve can still exceed.
    """

    def upper(e):
        e = np.atleast_1d(np.asarray(e, dtype=float))
        sy = np.minimum(1.0, survival(e, sums.y) + delta_y)
        sx = np.maximum(0.0, survival(e, sums.x) - delta_x)
        with np.errstate(over="ignore", invalid="ignore"):
            val = sy - np.where(sx > 0, np.exp(e + np.log(np.where(sx > 0, sx, 1.0))), 0.0)
        return val - delta

    def lower(e):
        e = np.atleast_1d(np.asarray(e, dtype=float))
        sy = np.maximum(0.0, survival(e, sums.y) - delta_y)
        sx = np.minimum(1.0, survival(e, sums.x) + delta_x)
        with np.errstate(over="ignore"):
            val = sy - np.exp(e + np.log(np.maximum(sx, 1e-300)))
        return val - delta

    with np.errstate(all="ignore"):
        eps_upper = _smallest_eps_at_most(lambda e: float(upper(e)[0]), upper(EPS_GRID))
        lv = lower(EPS_GRID)
    above = np.nonzero(lv > 0)[0]
    if above.size == 0:
        eps_lower = 0.0
    else:
        i = int(above[-1])
        with np.errstate(all="ignore"):
            eps_lower = (
                float(EPS_GRID[i])
                if i + 1 >= len(EPS_GRID)
                else float(brentq(lambda e: float(lower(e)[0]), float(EPS_GRID[i]), float(EPS_GRID[i + 1]), xtol=1e-12))
            )
    return eps_lower, eps_upper


def edgeworth_error_bound(history, delta: float) -> dict[str, Any]:
    """Uniform error bound of the order-1 expansion and the epsilon interval it implies.

    Returns a dict with ``delta_x``, ``delta_y``, ``epsilon_lower``, ``epsilon_upper``, ``certified``
    and ``reason``. Only iid schedules (a single ``(noise_multiplier, sample_rate)`` segment) are
    supported; otherwise the numbers are ``None`` and ``reason`` says "not available".
    """
    base = {"delta_x": None, "delta_y": None, "epsilon_lower": None, "epsilon_upper": None, "certified": False}
    if not history:
        return {**base, "reason": "no steps"}
    if len({(sigma, q) for sigma, q, _ in history}) > 1:
        return {
            **base,
            "reason": "not available: the uniform bound is implemented for identical steps only "
            "(this schedule has several noise multipliers / sample rates)",
        }
    sigma, q = history[0][:2]
    n = sum(int(k) for _, _, k in history)
    if sigma == 0.0:
        return {**base, "reason": "not available: a step without noise has infinite epsilon"}
    c = step_cumulants(q, sigma)
    dx = uniform_error_bound(c.x, n)
    dy = uniform_error_bound(c.y, n)
    sums = sum_cumulants(history)
    eps_lower, eps_upper = edgeworth_interval(sums, delta, dx, dy)
    if dy >= delta:
        eps_upper = math.inf
        reason = (
            f"not certifiable: Delta_Y = {dy:.3g} >= delta = {delta:g}, so the Edgeworth upper bound is "
            "infinite (the bound only shrinks like 1/sqrt(steps))"
        )
        certified = False
    elif math.isinf(eps_upper):
        certified = False
        reason = "not certifiable: no finite epsilon satisfies the bound"
    else:
        certified = True
        reason = f"certified: Delta_Y = {dy:.3g} < delta = {delta:g}"
    return {
        "delta_x": dx,
        "delta_y": dy,
        "epsilon_lower": eps_lower,
        "epsilon_upper": eps_upper,
        "certified": certified,
        "reason": reason,
    }


def edgeworth_summary(history, delta: float) -> dict[str, Any]:
    """Order-1/order-2 estimates and the order-1 error bound, for a privacy report.

    Where the expansion is numerically degenerate (e.g. tiny noise with a tiny sampling rate: the loss's
    variance underflows) the estimates are None and the bound says why; the certified epsilon is unaffected.
    """
    try:
        with np.errstate(all="ignore"):
            o1, o2 = edgeworth_epsilons(history, delta)
            return {"order1": o1, "order2": o2, "bound": edgeworth_error_bound(history, delta)}
    except (ArithmeticError, ValueError) as exc:
        reason = f"not available: the Edgeworth expansion is numerically degenerate here ({type(exc).__name__})"
        bound = {"delta_x": None, "delta_y": None, "epsilon_lower": None, "epsilon_upper": None, "certified": False,
                 "reason": reason}
        return {"order1": None, "order2": None, "bound": bound}
