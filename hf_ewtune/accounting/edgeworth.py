"""Edgeworth expansion of the summed privacy loss and the (epsilon, delta) curve it implies.

For the sums X = sum X_i and Y = sum Y_i with summed cumulants K1..K4 (see :mod:`.cumulants`),
``s = sqrt(K2)``, ``x = (t - K1) / s``, ``g3 = K3 / s^3``, ``g4 = K4 / s^4``, the survival form is::

    S(t) ~ sf(x) + pdf(x) * [ g3/6 He2(x) ]                                  (order 1, EW-Tune)
                 + pdf(x) * [ g4/24 He3(x) + g3^2/72 He5(x) ]                (order 2)

and ``delta(eps) = S_Y(eps) - e^eps S_X(eps)``. The estimate of epsilon is the *largest* root of
``delta(eps) = delta`` (the expansion is not guaranteed monotone), found by a grid scan and ``brentq``.
``e^eps S_X`` is evaluated in log space and negative ``S_X`` is clamped to 0 (errs towards a larger
epsilon). These are *estimates*, not guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from .cumulants import step_cumulants

EPS_GRID = np.concatenate([np.arange(0.0, 20.0, 0.01), np.arange(20.0, 200.0 + 1e-9, 0.1)])
EPS_MAX = float(EPS_GRID[-1])


@dataclass(frozen=True)
class SumCumulants:
    """Summed cumulants ``(K1, K2, K3, K4)`` of X (under P) and of Y (under Q)."""

    x: tuple[float, float, float, float]
    y: tuple[float, float, float, float]


def sum_cumulants(segments: Iterable[Sequence[float]]) -> SumCumulants:
    """Sum per-step cumulants over segments ``(noise_multiplier, sample_rate, num_steps)``.

    Example:
        >>> k = sum_cumulants([(1.0, 0.01, 1000)])
        >>> round(k.x[1], 4)
        0.1601
    """
    kx = np.zeros(4)
    ky = np.zeros(4)
    for sigma, q, n in segments:
        c = step_cumulants(float(q), float(sigma))
        kx += n * np.array([c.x.kappa1, c.x.kappa2, c.x.kappa3, c.x.kappa4])
        ky += n * np.array([c.y.kappa1, c.y.kappa2, c.y.kappa3, c.y.kappa4])
    return SumCumulants(x=tuple(float(v) for v in kx), y=tuple(float(v) for v in ky))


def _correction(x: np.ndarray, k: Sequence[float], order: int) -> np.ndarray:
    """The bracket multiplying pdf(x) in the survival form."""
    s = math.sqrt(k[1])
    g3 = k[2] / s**3
    x2 = x * x
    corr = g3 / 6.0 * (x2 - 1.0)
    if order >= 2:
        g4 = k[3] / s**4
        he3 = x * (x2 - 3.0)
        he5 = x * (x2 * x2 - 10.0 * x2 + 15.0)
        corr = corr + g4 / 24.0 * he3 + g3 * g3 / 72.0 * he5
    return corr


def survival(t: np.ndarray, k: Sequence[float], *, order: int = 1) -> np.ndarray:
    """Edgeworth survival function ``S(t) = P[sum > t]`` (may be negative far in the tail).

    Example:
        >>> float(survival(np.array([0.0]), (0.0, 1.0, 0.0, 0.0))[0])
        0.5
    """
    t = np.asarray(t, dtype=float)
    with np.errstate(all="ignore"):
        x = (t - k[0]) / math.sqrt(k[1])
        return norm.sf(x) + norm.pdf(x) * _correction(x, k, order)


def log_exp_eps_survival(eps: np.ndarray, k: Sequence[float], *, order: int = 1) -> np.ndarray:
    """``log(e^eps * max(S(eps), 0))`` computed in log space (``-inf`` where the expansion is <= 0)."""
    eps = np.asarray(eps, dtype=float)
    with np.errstate(all="ignore"):  # under/overflow here is benign and handled below
        x = (eps - k[0]) / math.sqrt(k[1])
        logsf = norm.logsf(x)
        ratio = np.exp(norm.logpdf(x) - logsf) * _correction(x, k, order)
        log_term = np.where(ratio > -1.0, np.log1p(np.maximum(ratio, -1.0 + 1e-300)), -np.inf)
        return eps + logsf + log_term


def delta_of_epsilon(eps: np.ndarray, sums: SumCumulants, *, order: int = 1) -> np.ndarray:
    """Edgeworth estimate of ``delta(eps) = S_Y(eps) - e^eps S_X(eps)`` (S_X clamped at 0)."""
    eps = np.asarray(eps, dtype=float)
    with np.errstate(all="ignore"):
        return survival(eps, sums.y, order=order) - np.exp(log_exp_eps_survival(eps, sums.x, order=order))


def largest_root(func, grid: np.ndarray, values: np.ndarray) -> float:
    """Largest root of ``func`` (values = func(grid) - target) from the last + to - sign change.

    Returns 0.0 if ``values <= 0`` everywhere and ``inf`` if the last value is still positive.
    """
    if values[-1] > 0:
        return math.inf
    pos = values > 0
    idx = np.nonzero(pos[:-1] & ~pos[1:])[0]
    if idx.size == 0:
        return 0.0
    i = int(idx[-1])
    lo, hi = float(grid[i]), float(grid[i + 1])
    if values[i + 1] == 0:
        return hi
    return float(brentq(func, lo, hi, xtol=1e-12, rtol=1e-12))


def epsilon_estimate(delta: float, sums: SumCumulants, *, order: int = 1) -> float:
    """Edgeworth point estimate of epsilon at ``delta`` (largest root; an estimate, not a bound).

    Example:
        >>> k = sum_cumulants([(0.7865, 0.029696, 660)])
        >>> round(epsilon_estimate(1e-5, k, order=1), 3)
        7.993
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if not (sums.x[1] > 0 and sums.y[1] > 0):  # degenerate: no privacy loss at all (or no steps)
        return 0.0

    def f(e: float) -> float:
        return float(delta_of_epsilon(np.array([e]), sums, order=order)[0]) - delta

    values = delta_of_epsilon(EPS_GRID, sums, order=order) - delta
    return largest_root(f, EPS_GRID, values)
