"""Saddle-point accountant (SPA): tilted moments of the privacy loss and the SPA estimates.

Alghamdi, Gomez, Asoodeh, Calmon, Kosut, Sankar, "The Saddle-Point Method in Differential Privacy",
ICML 2023 (arXiv 2208.09595). Notation (ours, following the paper's construction):

* One Poisson-subsampled Gaussian step (sensitivity 1, noise multiplier ``sigma``, ``mu = 1/sigma``,
  rate ``q``): ``ell(z) = log(1 - q + q exp(mu z - mu^2/2))`` (see :func:`cumulants.pllr`).
* Two directions of add-or-remove-one adjacency (the published epsilon is the larger of the two, as in
  dp-accounting's PLD):
  ``"remove"``: ``P = (1-q) N(0,1) + q N(mu,1)`` against ``N(0,1)``, privacy loss ``L = ell(Z)``, ``Z ~ P``;
  ``"add"``: ``P = N(0,1)`` against the mixture, ``L = -ell(Z)``, ``Z ~ N(0,1)``.
* ``delta(eps) = E_P[(1 - exp(eps - L))^+]`` for the composed loss ``L = sum of independent L_i``.
* Exponential tilting (the paper's change of measure): with ``K(t) = log E_P[exp(t L)]`` (the
  cumulant generating function, CGF) and ``P_t`` the tilted law ``dP_t/dP = exp(t L - K(t))``,

      ``delta(eps) = exp(K(t) - t eps) E_{P_t}[psi_t(L - eps)]``,  ``psi_t(x) = exp(-t x)(1 - exp(-x))^+``,

  exactly, for every ``t > 0``. Under ``P_t`` the summands stay independent with means ``K_i'(t)`` and
  variances ``K_i''(t)``.
* SPA-CLT (the paper's "SPA-CLT"): pick the saddle point ``t0`` with ``K'(t0) = eps`` and replace the
  tilted ``L - eps`` by ``N(0, K''(t0))``; ``E psi_t(G)`` then has a closed form (:func:`gaussian_psi_mean`).
* SPA-MSD (first-order method of steepest descent):
  ``delta ~ exp(K(t0) - t0 eps) / (t0 (1 + t0) sqrt(2 pi K''(t0)))``, the large-variance limit of SPA-CLT.

Both are ESTIMATES. The rigorous bound (Berry-Esseen on the tilted sum, whose error carries the same
factor ``exp(K(t) - t eps)`` as delta) is in :mod:`.saddle_point_bound`. The numerical inputs
(``K``, ``K'``, ``K''`` and the tilted third absolute central moment) come from
:func:`tilted_moments`, which returns each with a proven error radius (:mod:`.tilted_quadrature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr

from .cumulants import pllr
from .tilted_quadrature import U, TiltedIntegrals, strip_radius, tilt_exponent, tilted_integrals, window

DIRECTIONS = ("remove", "add")


@dataclass(frozen=True)
class TiltedMoments:
    """Moments of one step's privacy loss under the tilted law ``P_t``, each with a PROVEN error radius.

    Attributes:
        log_mgf: ``K(t) = log E_P[exp(t L)]``; ``log_mgf_err`` bounds its error.
        mean: ``K'(t)``, the tilted mean; ``mean_err`` bounds its error.
        var: ``K''(t)``, the tilted variance; ``var_err`` bounds its error.
        abs3: an upper bound on the tilted third absolute central moment ``E_t|L - K'(t)|^3``
            (already includes its numerical error).
    """

    log_mgf: float
    log_mgf_err: float
    mean: float
    mean_err: float
    var: float
    var_err: float
    abs3: float


def _kink(sample_rate: float, noise_multiplier: float, direction: str, centre: float) -> float | None:
    """The unique ``z`` with ``L(z) = centre`` (``ell`` is strictly increasing), or None if there is none."""
    q, mu = sample_rate, 1.0 / noise_multiplier
    target = centre if direction == "remove" else -centre
    if q >= 1.0:
        a = target
    elif target > 700.0:  # exp(target) - (1 - q) = exp(target) to double precision
        a = target - math.log(q)
    else:
        inner = math.expm1(target) + q  # exp(target) - (1 - q)
        if not inner > 0.0:
            return None
        a = math.log(inner / q)
    return (a + 0.5 * mu * mu) / mu


@lru_cache(maxsize=8192)
def quick_moments(sample_rate: float, noise_multiplier: float, t: float, direction: str) -> TiltedMoments:
    """``K``, ``K'``, ``K''`` of one step WITHOUT error radii (trapezoid at step ``rho/8``, exponentially accurate
    for these analytic integrands, but not checked): for the saddle-point search and the SPA estimates only.
    The certified bound uses :func:`tilted_moments`. ``abs3`` is 0 (not computed)."""
    q, sigma, t = float(sample_rate), float(noise_multiplier), float(t)
    c = tilt_exponent(t, direction)
    lo, hi, _ = window(q, sigma, c)
    h = strip_radius(sigma, c) / 8.0
    z = lo + h * np.arange(int(math.ceil((hi - lo) / h)) + 1)
    ell = pllr(z, sample_rate=q, noise_multiplier=sigma)
    logw = -0.5 * z * z + c * ell
    peak = float(logw.max())
    w = np.exp(logw - peak)
    loss = ell if direction == "remove" else -ell
    m0 = float(w.sum())
    mean = float((w * loss).sum()) / m0
    d = loss - mean
    var = float((w * d * d).sum()) / m0
    log_mgf = math.log(m0 * h) + peak - 0.5 * math.log(2.0 * math.pi)
    return TiltedMoments(log_mgf, 0.0, mean, 0.0, var, 0.0, 0.0)


def _anchor(q: float, sigma: float, t: float, direction: str, centre: float) -> float:
    kink = _kink(q, sigma, direction, centre)
    if kink is None or not math.isfinite(kink):
        lo, _, _ = window(q, sigma, tilt_exponent(t, direction))
        return lo  # any anchor is valid; the centre L(lo) is only a worse centre (Minkowski pays for it)
    return kink


def _moments_from(r: TiltedIntegrals) -> TiltedMoments | None:
    """Interval propagation from the four integrals (module :mod:`.tilted_quadrature`) to the moments."""
    (m0, m1, m2, m3), (e0, e1, e2, e3) = r.values, r.radii
    if not (m0 > 0.0 and e0 < 0.5 * m0):
        return None
    slack = 8.0 * U
    log_m0 = math.log(m0)
    log_mgf = log_m0 + r.peak - 0.5 * math.log(2.0 * math.pi)
    log_mgf_err = -math.log1p(-e0 / m0) + slack * (abs(log_m0) + abs(r.peak) + 2.0)
    # |a/b - A/B| <= (|a - A| + |a/b| |b - B|) / (B - |b - B|)
    r1 = m1 / m0
    r1_err = (e1 + abs(r1) * e0) / (m0 - e0) + slack * abs(r1)
    mean = r.c0 + r1
    mean_err = r1_err + r.c0_err + slack * (abs(r.c0) + abs(r1))
    r2 = m2 / m0
    r2_err = (e2 + r2 * e0) / (m0 - e0) + slack * r2
    var = r2 - r1 * r1
    var_err = r2_err + 2.0 * abs(r1) * r1_err + r1_err**2 + slack * (r2 + r1 * r1)
    # Minkowski: (E|L - mean|^3)^(1/3) <= (E|L - c0|^3)^(1/3) + |mean - c0|, with c0 the exact L(anchor)
    rho_c = (m3 + e3) / (m0 - e0) * (1.0 + slack)
    abs3 = (rho_c ** (1.0 / 3.0) * (1.0 + slack) + abs(r1) + r1_err) ** 3 * (1.0 + 1e-12)
    out = (log_mgf, log_mgf_err, mean, mean_err, var, var_err, abs3)
    if not all(math.isfinite(x) for x in out):
        return None
    return TiltedMoments(*(float(x) for x in out))


@lru_cache(maxsize=8192)
def tilted_moments(sample_rate: float, noise_multiplier: float, t: float, direction: str) -> TiltedMoments | None:
    """CGF ``K(t)``, ``K'(t)``, ``K''(t)`` and the tilted third absolute moment of one step, with PROVEN radii.

    The integrals and their radii come from :func:`.tilted_quadrature.tilted_integrals` (its docstring
    states the proof: a complex majorant of the integrands in a strip, the Trefethen-Weideman bound for
    the analytic ones, Euler-Maclaurin plus Cauchy's estimate for ``|L - c0|^3`` whose kink is a node,
    closed-form tails, and floating-point rounding term by term). The anchor is placed at the kink of the
    first guess of the tilted mean (a second pass re-anchors if that guess was off by more than
    ``1e-7`` standard deviations). Radii are then propagated through the ratios (interval arithmetic)
    into ``K, K', K''``, and Minkowski (``rho^(1/3) <= rho_c^(1/3) + |K' - c0|``) turns the moment about
    ``c0`` into an upper bound on the one about the true mean.

    Returns None where the grid would exceed the point budget (very large tilts) or the numerics are
    unusable (the caller then skips this tilt; any tilt gives a valid bound).

    Example:
        >>> m = tilted_moments(1.0, 1.0, 0.5, "remove")   # Gaussian, mu = 1: L ~ N(mu^2/2, mu^2) under P
        >>> round(m.log_mgf, 9), round(m.mean, 9), round(m.var, 9)   # K(t) = t(t+1)/2, K' = t + 1/2, K'' = 1
        (0.375, 1.0, 1.0)
    """
    q, sigma, t = float(sample_rate), float(noise_multiplier), float(t)
    if not (sigma > 0.0 and 0.0 < q <= 1.0 and t > 0.0):
        return None
    anchor = _anchor(q, sigma, t, direction, quick_moments(q, sigma, t, direction).mean)
    result = None
    for _ in range(2):
        r = tilted_integrals(q, sigma, t, direction, anchor)
        if r is None:
            return None
        result = _moments_from(r)
        if result is None or abs(result.mean - r.c0) <= 1e-7 * math.sqrt(max(result.var, 0.0)):
            break
        anchor = _anchor(q, sigma, t, direction, result.mean)
    return result


def clear_caches() -> None:
    """Forget every cached tilted moment and saddle point (for cold timings)."""
    tilted_moments.cache_clear()
    quick_moments.cache_clear()
    saddle_point_tilt.cache_clear()


# --------------------------------------------------------------------------- composed CGF of a history
@dataclass(frozen=True)
class ComposedMoments:
    """Sums over a history ``[(sigma, q, n), ...]`` of the per-step tilted moments at one tilt ``t``."""

    t: float
    log_mgf: float
    log_mgf_err: float
    mean: float
    mean_err: float
    var: float
    var_err: float
    abs3_sum: float
    segments: int


def composed_moments(
    history: Sequence[Sequence[float]], t: float, direction: str, *, rigorous: bool = True
) -> ComposedMoments | None:
    """``K(t) = sum n_j K_j(t)`` and friends for the composition (independent steps under ``P_t``).

    ``rigorous=False`` uses :func:`quick_moments` (no radii, no third moment): estimates and the saddle search only.
    """
    vals = np.zeros(7)
    moments = tilted_moments if rigorous else quick_moments
    for sigma, q, n in history:
        m = moments(float(q), float(sigma), float(t), direction)
        if m is None:
            return None
        vals += int(n) * np.array([m.log_mgf, m.log_mgf_err, m.mean, m.mean_err, m.var, m.var_err, m.abs3])
    # rounding of the sums (<= segments * 1.1e-16 relative) is covered by a 1e-12 relative allowance
    slack = 1e-12 * np.abs(vals)
    return ComposedMoments(
        t=float(t),
        log_mgf=float(vals[0]),
        log_mgf_err=float(vals[1] + slack[0]),
        mean=float(vals[2]),
        mean_err=float(vals[3] + slack[2]),
        var=float(vals[4]),
        var_err=float(vals[5] + slack[4]),
        abs3_sum=float(vals[6] * (1.0 + 1e-12)),
        segments=len(history),
    )


# --------------------------------------------------------------------------- Gaussian pieces
def gaussian_psi_mean(t: float, shift: float, var: float) -> float:
    """``E[psi_t(G)]`` for ``G ~ N(shift, var)``, ``psi_t(x) = exp(-t x)(1 - exp(-x))^+``, in closed form:

    ``exp(-t m + t^2 v/2) Phi(m/s - t s) - exp(-(t+1) m + (t+1)^2 v/2) Phi(m/s - (t+1) s)``.

    Each term is evaluated in log space (``log_ndtr``), without overflow.

    Example:
        >>> round(gaussian_psi_mean(1.0, 0.0, 1e-12), 6)   # G = 0: psi_t(0) = 0
        0.0
    """
    s = math.sqrt(var)
    if s == 0.0:
        return math.exp(-t * shift) * -math.expm1(-shift) if shift > 0 else 0.0
    a = shift / s
    log1 = -t * shift + 0.5 * (t * s) ** 2 + float(log_ndtr(a - t * s))
    log2 = -(t + 1.0) * shift + 0.5 * ((t + 1.0) * s) ** 2 + float(log_ndtr(a - (t + 1.0) * s))
    if log2 >= log1:
        return 0.0
    return math.exp(log1) * -math.expm1(log2 - log1)


def psi_max(t: float) -> float:
    """``max_x psi_t(x) = (t/(1+t))^t / (1+t)``, reached at ``x = log((1+t)/t)``; ``psi_t`` has total variation
    twice this (it rises from 0 and falls back to 0)."""
    return math.exp(t * (math.log(t) - math.log1p(t)) - math.log1p(t))


# --------------------------------------------------------------------------- the estimates
def _saddle_log_delta(history, t: float, direction: str, method: str) -> tuple[float, float] | None:
    """``(eps, log delta_estimate)`` at tilt ``t`` read as the saddle point (``eps = K'(t)``)."""
    c = composed_moments(history, t, direction, rigorous=False)
    if c is None:
        return None
    eps = c.mean
    base = c.log_mgf - t * eps
    if method == "msd":
        return eps, base - math.log(t * (1.0 + t) * math.sqrt(2.0 * math.pi * c.var))
    g = gaussian_psi_mean(t, 0.0, c.var)
    return eps, (base + math.log(g)) if g > 0 else -math.inf


T_MIN, T_MAX = 1e-3, 5e3


@lru_cache(maxsize=1024)
def saddle_point_tilt(history: tuple, delta: float, direction: str, method: str = "clt") -> float | None:
    """The saddle point ``t0`` at which the SPA estimate of delta equals ``delta`` (None if outside range).

    ``history`` is a tuple of ``(sigma, q, n)`` tuples (cached: the estimate and the bound share it).
    """
    log_tol = 1e-6
    target = math.log(delta)

    def f(log_t: float) -> float:
        r = _saddle_log_delta(history, math.exp(log_t), direction, method)
        return math.inf if r is None else r[1] - target

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    f_lo = f(lo)
    if f_lo <= 0:
        return T_MIN
    # expand upwards until the estimate falls below delta (delta_estimate decreases in t)
    grid = np.linspace(lo, hi, 9)
    prev = lo
    for x in grid[1:]:
        fx = f(x)
        if math.isinf(fx):
            return None
        if fx <= 0:
            return math.exp(brentq(f, prev, x, xtol=log_tol))
        prev = x
    return None


def spa_epsilon(history: Sequence[Sequence[float]], delta: float, *, method: str = "clt") -> float:
    """Saddle-point ESTIMATE of epsilon (``method="clt"``: SPA-CLT, ``"msd"``: SPA-MSD); max over directions.

    An estimate, not a guarantee (see :func:`.saddle_point_bound.spa_epsilon_upper` for the bound).
    ``inf`` if the saddle point lies outside ``[1e-3, 5e3]``.

    Example:
        >>> round(spa_epsilon([(2.0, 0.01, 3000)], 1e-5), 3)   # PLD (certified): 1.120
        1.12
    """
    history = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    best = 0.0
    for direction in DIRECTIONS:
        t = saddle_point_tilt(history, delta, direction, method)
        if t is None:
            return math.inf
        r = _saddle_log_delta(history, t, direction, method)
        best = max(best, r[0])
    return float(best)
