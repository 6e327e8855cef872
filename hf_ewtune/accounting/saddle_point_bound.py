"""Rigorous upper bound of the saddle-point accountant (tilted Berry-Esseen), evaluated in floating point.

The bound (the construction of Alghamdi et al., arXiv 2208.09595, Sec. "error bounds" of the SPA:
tilting + a Berry-Esseen bound on the tilted sum; we re-derive it here so every constant is explicit).
For every ``t > 0`` the tilting identity (see :mod:`.saddle_point`) gives exactly

    ``delta(eps) = exp(K(t) - t eps) E_t[psi_t(L - eps)]``.

``psi_t`` vanishes at both ends and has total variation ``2 psi_max(t)``, so integrating by parts,
``|E psi_t(L - eps) - E psi_t(G - eps)| <= 2 psi_max(t) sup_x |F_t(x) - Phi_G(x)|`` for any ``G``. With
``G ~ N(K'(t), K''(t))`` the Kolmogorov distance is at most the Berry-Esseen bound for independent
summands ``C0 sum_i E_t|L_i - K_i'|^3 / K''(t)^{3/2}`` with ``C0 = 0.5600`` (Shevtsova 2010, non-identical
summands) or ``C0 = 0.4748`` (Shevtsova 2011, identical summands: a single ``(sigma, q)`` segment). So

    ``delta(eps) <= exp(K(t) - t eps) min(psi_max(t), E psi_t(G - eps) + 2 beta psi_max(t))``

for EVERY ``t > 0``: the error carries the same factor ``exp(K(t) - t eps)`` as delta, hence it is
relative to delta. Any ``eps`` at which the right side is ``<= delta`` is a valid epsilon.

Floating point: ``K, K', K''`` and the third absolute moment come with PROVEN error radii
(:func:`.saddle_point.tilted_moments`, :mod:`.tilted_quadrature`). We use ``K + err``; the Gaussian term is evaluated at the
computed ``K'``, ``K''``, and the Kolmogorov distance between that Gaussian and the one at the true
moments (``|dm| / (s sqrt(2 pi)) + |r - 1| / (min(1, r) sqrt(2 pi e))``, ``r`` the ratio of standard
deviations) is added to ``beta``; the Berry-Esseen term uses the upper third moment and the lower
variance. Exponents are inflated by ``1e-12 (1 + |x|)`` before ``exp`` and the two Gaussian terms are
rounded apart (first up, second down). The final ``eps`` is returned only after ``delta_upper(eps) <=
delta`` was checked at that very ``eps`` (bisection keeps the checked end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from scipy.special import log_ndtr

from .saddle_point import DIRECTIONS, ComposedMoments, composed_moments, psi_max, saddle_point_tilt

C0_IID = 0.4748  # Shevtsova (2011), identically distributed summands
C0_NONIID = 0.5600  # Shevtsova (2010), independent non-identically distributed summands
_ROUND = 1e-12

BOUND_DESCRIPTION = (
    "saddle-point accountant upper bound (exponential tilting + Berry-Esseen, Alghamdi et al. 2023; "
    "every numerical input with a proven error radius; see docs/accounting.md)"
)


def _up(x: float) -> float:
    return x + _ROUND * (1.0 + abs(x))


def _down(x: float) -> float:
    return x - _ROUND * (1.0 + abs(x))


def kolmogorov_beta(c: ComposedMoments) -> float:
    """Upper bound on ``sup_x |F_t(x) - Phi(x; computed K', computed K'')|`` (capped at 1), or 1 if unusable."""
    var_lo = c.var - c.var_err
    if not var_lo > 0.0:
        return 1.0
    c0 = C0_IID if c.segments == 1 else C0_NONIID
    berry_esseen = c0 * c.abs3_sum / var_lo**1.5
    s_lo, s_hat, s_hi = math.sqrt(var_lo), math.sqrt(c.var), math.sqrt(c.var + c.var_err)
    shift = c.mean_err / (s_lo * math.sqrt(2.0 * math.pi))
    scale = max(abs(r - 1.0) / min(1.0, r) for r in (s_lo / s_hat, s_hi / s_hat)) / math.sqrt(2.0 * math.pi * math.e)
    return min(1.0, (berry_esseen + shift + scale) * (1.0 + 1e-9))


def _gaussian_psi_upper(t: float, shift: float, var: float) -> float:
    """Upper bound on ``E psi_t(G)``, ``G ~ N(shift, var)`` (first term rounded up, second down)."""
    s = math.sqrt(var)
    a = shift / s
    log1 = _up(-t * shift + 0.5 * (t * s) ** 2 + float(log_ndtr(a - t * s)))
    log2 = _down(-(t + 1.0) * shift + 0.5 * ((t + 1.0) * s) ** 2 + float(log_ndtr(a - (t + 1.0) * s)))
    if log2 >= log1:
        return 0.0
    return math.exp(log1) * -math.expm1(log2 - log1)


def log_delta_upper(c: ComposedMoments, eps: float, beta: float) -> float:
    """``log`` of the upper bound on ``delta(eps)`` at the tilt ``c.t`` (``+inf``-safe)."""
    t = c.t
    pmax = psi_max(t) * (1.0 + 1e-12)
    body = min(pmax, _gaussian_psi_upper(t, c.mean - eps, c.var) + 2.0 * beta * pmax)
    if body <= 0.0:
        return -math.inf
    return _up(c.log_mgf + c.log_mgf_err - t * eps) + _up(math.log(body))


def _epsilon_at_tilt(c: ComposedMoments, delta: float) -> float:
    """Smallest ``eps >= 0`` (to 1e-6 relative) with ``log_delta_upper <= log delta`` at this tilt."""
    beta = kolmogorov_beta(c)
    target = math.log(delta)

    def ok(e: float) -> bool:
        return log_delta_upper(c, e, beta) <= target

    if ok(0.0):
        return 0.0
    hi = max(1e-3, abs(c.mean))
    while not ok(hi):
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    lo = 0.0
    while hi - lo > 1e-7 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi  # ok(hi) was checked


@dataclass(frozen=True)
class SaddlePointBound:
    """Certified epsilon of the saddle-point bound, per direction, with the tilts and beta that gave it."""

    epsilon: float
    directions: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "directions": self.directions}


TILT_FACTORS = (0.7, 0.85, 1.0, 1.2, 1.45)
FALLBACK_TILTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def spa_bound(history: Sequence[Sequence[float]], delta: float) -> SaddlePointBound:
    """Certified upper bound on epsilon from the saddle-point (tilted Berry-Esseen) bound; ``inf`` if vacuous.

    The tilts tried are multiples of the SPA-CLT saddle point (any tilt gives a valid bound; the
    saddle point is close to the best); the smallest certified epsilon over them is kept, per
    direction, and the larger direction is returned.

    Example:
        >>> b = spa_bound([(2.0, 0.01, 3000)], 1e-5)
        >>> 1.1196 < b.epsilon < 1.25   # PLD (certified): 1.1196
        True
    """
    history = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not history:
        return SaddlePointBound(0.0, {})
    if any(s == 0.0 for s, _, _ in history):
        return SaddlePointBound(math.inf, {})
    out: dict[str, dict[str, float]] = {}
    worst = 0.0
    for direction in DIRECTIONS:
        t0 = saddle_point_tilt(history, delta, direction)
        tilts = FALLBACK_TILTS if t0 is None else tuple(t0 * f for f in TILT_FACTORS)
        best = {"epsilon": math.inf, "tilt": math.nan, "beta": math.nan}
        for t in tilts:
            c = composed_moments(history, t, direction)
            if c is None:
                continue
            eps = _epsilon_at_tilt(c, delta)
            if eps < best["epsilon"]:
                best = {"epsilon": float(eps), "tilt": float(t), "beta": float(kolmogorov_beta(c))}
        out[direction] = best
        worst = max(worst, best["epsilon"])
    return SaddlePointBound(float(worst), out)


def spa_epsilon_upper(history: Sequence[Sequence[float]], delta: float) -> float:
    """Certified epsilon (upper bound) of the saddle-point accountant; ``inf`` where the bound is vacuous."""
    return spa_bound(history, delta).epsilon
