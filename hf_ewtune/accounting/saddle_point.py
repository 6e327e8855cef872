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
:func:`tilted_moments`, which returns each with an explicit error radius.
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

#: Margin (in units of the unit-variance noise) of the integration window beyond the extreme modes of the
#: tilted density; the tails outside it are bounded explicitly (see :func:`_window`), ~exp(-200) relative.
HALF_WIDTH = 20.0
#: Trapezoid step; every integral is also computed at STEP / 2 and the difference, times SAFETY, is
#: its error radius.
STEP = 0.06
SAFETY = 10.0
#: Relative allowance added to every integral's error radius: floating-point rounding of sums of
#: ~10,000 terms (< 1e4 * 1.1e-16 relative) is far below it.
REL_FLOOR = 1e-11
#: Largest tilt for which moments are computed (the grid grows like t / sigma).
MAX_POINTS = 400_000

DIRECTIONS = ("remove", "add")


@dataclass(frozen=True)
class TiltedMoments:
    """Moments of one step's privacy loss under the tilted law ``P_t``, each with an error radius.

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


def _grid(lo: float, hi: float, step: float) -> np.ndarray:
    n = max(2, int(math.ceil((hi - lo) / step))) + 1
    return np.linspace(lo, hi, n)


def _trapezoid(values: np.ndarray, z: np.ndarray) -> float:
    h = z[1] - z[0]
    return float(h * (values.sum() - 0.5 * (values[0] + values[-1])))


def _window(sample_rate: float, noise_multiplier: float, t: float, direction: str) -> tuple[float, float]:
    """Integration window ``[lo, hi]`` for the tilted density ``w(z) = phi(z) exp(c ell(z))``, ``c = 1 + t``
    (remove) or ``-t`` (add).

    Since ``0 <= ell' <= mu``, ``(log w)' = -z + c ell'(z)`` is ``<= -HALF_WIDTH`` right of ``hi`` and
    ``>= HALF_WIDTH`` left of ``lo``; so each tail integral is at most ``w(end) / HALF_WIDTH`` (see
    :func:`tilted_moments` for the allowance that adds).
    """
    mu = 1.0 / noise_multiplier
    if direction == "remove":
        return -HALF_WIDTH, (1.0 + t) * mu + HALF_WIDTH
    return -t * mu - HALF_WIDTH, HALF_WIDTH


def _log_weight(z: np.ndarray, ell: np.ndarray, t: float, direction: str) -> np.ndarray:
    c = (1.0 + t) if direction == "remove" else -t
    return -0.5 * z * z + c * ell


def _raw_integrals(z: np.ndarray, sample_rate: float, noise_multiplier: float, t: float, direction: str, centre: float):
    """Integrals (on grid ``z``, relative to the peak weight) of w, w L, w (L - centre)^2, w |L - centre|^3."""
    peak, integrands, _, _ = _integrands(z, sample_rate, noise_multiplier, t, direction, centre)
    return peak, np.array([_trapezoid(f, z) for f in integrands])


def _integrands(z: np.ndarray, sample_rate: float, noise_multiplier: float, t: float, direction: str, centre: float):
    """``(peak, (w, w L, w d^2, w |d|^3), L, d)`` on grid ``z``, with ``d = L - centre`` and w relative to its peak."""
    ell = pllr(z, sample_rate=sample_rate, noise_multiplier=noise_multiplier)
    loss = ell if direction == "remove" else -ell
    logw = _log_weight(z, ell, t, direction)
    peak = float(logw.max())
    w = np.exp(logw - peak)
    d = loss - centre
    wd2 = w * d * d
    return peak, (w, w * loss, wd2, wd2 * np.abs(d)), loss, d


def _kink(sample_rate: float, noise_multiplier: float, direction: str, centre: float) -> float | None:
    """The unique ``z`` with ``L(z) = centre`` (``ell`` is strictly increasing), or None if there is none."""
    q, mu = sample_rate, 1.0 / noise_multiplier
    target = centre if direction == "remove" else -centre
    if q >= 1.0:
        a = target
    else:
        inner = math.expm1(target) + q  # exp(target) - (1 - q)
        if not inner > 0.0:
            return None
        a = math.log(inner / q)
    return (a + 0.5 * mu * mu) / mu


@lru_cache(maxsize=8192)
def tilted_moments(sample_rate: float, noise_multiplier: float, t: float, direction: str) -> TiltedMoments | None:
    """CGF ``K(t)``, ``K'(t)``, ``K''(t)`` and the tilted third absolute moment of one step, with error radii.

    Numerics: the tilted density ``phi(z) exp(c ell(z))`` is integrated with the trapezoid rule on a
    uniform grid over its window (:func:`_window`: 20 beyond the extreme modes; the truncated tails are
    bounded by ``w(end) (|L(end) - c| + 2)^3 / (20 - 3 mu)`` and added to every error radius). The
    integrands of ``K, K', K''`` are analytic with Gaussian tails, where the trapezoid rule converges
    geometrically; ``|L - c|^3`` (``c`` a first estimate of the tilted mean) has one kink, at the unique
    ``z`` with ``L(z) = c`` (``ell`` is strictly increasing), and the grid is anchored there so the kink is
    a node (the integrand vanishes to third order at it, so the rule is O(h^4) on each side).
    Every integral is computed at steps ``h`` and ``h/2`` (the same nodes, every other one); the ``h/2`` value is used and its error radius
    is ``SAFETY * |I_h - I_{h/2}| + REL_FLOOR * |I|``. Radii are then propagated through the ratios
    (interval arithmetic) into the radii of ``K, K', K''`` and into an upper bound on the third
    absolute moment about the true mean (Minkowski: ``rho^(1/3) <= rho_c^(1/3) + |K' - c|``).
    The quadrature radii are estimates from the step-halving difference (with a 10x margin), not a proof;
    the tail allowance and everything after it are rigorous.

    Returns None where the grid would exceed ``MAX_POINTS`` (very large tilts).

    Example:
        >>> m = tilted_moments(1.0, 1.0, 0.5, "remove")   # Gaussian, mu = 1: L ~ N(mu^2/2, mu^2) under P
        >>> round(m.log_mgf, 9), round(m.mean, 9), round(m.var, 9)   # K(t) = t(t+1)/2, K' = t + 1/2, K'' = 1
        (0.375, 1.0, 1.0)
    """
    q, sigma, t = float(sample_rate), float(noise_multiplier), float(t)
    lo, hi = _window(q, sigma, t, direction)
    if (hi - lo) / STEP * 2 > MAX_POINTS or HALF_WIDTH - 3.0 / sigma < 1.0:
        return None  # grid too large, or sigma < 0.081: the tail allowance below needs HALF_WIDTH > 3 mu
    # Pass 1: a centre close to the tilted mean (analytic integrands, coarse grid).
    z = _grid(lo, hi, 4 * STEP)
    _, first = _raw_integrals(z, q, sigma, t, direction, 0.0)
    centre = first[1] / first[0]
    # Pass 2: moments about `centre` on a uniform grid of step h/2 that has the kink of |L - centre|^3
    # as a node; every other node of it is the step-h grid.
    kink = _kink(q, sigma, direction, centre)
    anchor = kink if kink is not None and lo < kink < hi else lo
    fine = STEP / 2
    k_lo = -int(math.ceil((anchor - lo) / STEP)) * 2
    k_hi = int(math.ceil((hi - anchor) / STEP)) * 2
    zf = anchor + fine * np.arange(k_lo, k_hi + 1)
    peak, integrands, loss, d = _integrands(zf, q, sigma, t, direction, centre)
    w = integrands[0]
    an = np.array([_trapezoid(f, zf) for f in integrands])
    an_h = np.array([_trapezoid(f[::2], zf[::2]) for f in integrands])
    # Tails outside the window: log w falls at rate >= HALF_WIDTH there and |L|, |L - centre| grow at
    # rate <= mu, so the tail of w |f|^k (f = L or L - centre, k <= 3) is at most
    # w(end) (|f(end)| + 1)^k / (HALF_WIDTH - k mu); one allowance covering all four integrands:
    ends = [
        (float(w[i]), max(abs(float(d[i])), abs(float(loss[i])))) for i in (0, -1)
    ]
    tail = sum(we * (de + 2.0) ** 3 for we, de in ends) / (HALF_WIDTH - 3.0 / sigma)
    err = SAFETY * np.abs(an - an_h) + REL_FLOOR * np.abs(an) + tail
    m0, m1, m2, abs3 = an
    e0, e1, e2, err3 = err
    if not (np.all(np.isfinite(an)) and np.all(np.isfinite(err)) and 0.0 < e0 < 0.5 * m0):
        return None  # unusable numerics: the caller skips this tilt (any tilt gives a valid bound)
    # K(t) = log(M0) + peak - log sqrt(2 pi)  (P = N(0,1)-based weight; the mixture is phi * exp(ell)).
    log_mgf = math.log(m0) + peak - 0.5 * math.log(2.0 * math.pi)
    log_mgf_err = -math.log1p(-e0 / m0) + 1e-15 * (abs(log_mgf) + 1.0)
    mean = float(m1 / m0)
    # |a/b - A/B| <= (|a - A| + |A/B| |b - B|) / (B - |b - B|)
    mean_err = (e1 + abs(mean) * e0) / (m0 - e0) + 1e-15 * abs(mean)
    delta = mean - centre
    var = float(m2 / m0 - delta * delta)
    var_err = (e2 + (m2 / m0) * e0) / (m0 - e0) + 2.0 * abs(delta) * mean_err + mean_err**2 + 1e-15 * var
    rho_centre = (abs3 + err3) / (m0 - e0)
    abs3_upper = (rho_centre ** (1.0 / 3.0) + abs(delta) + mean_err) ** 3 * (1.0 + 1e-12)
    return TiltedMoments(*(float(x) for x in (log_mgf, log_mgf_err, mean, mean_err, var, var_err, abs3_upper)))


def clear_caches() -> None:
    """Forget every cached tilted moment and saddle point (for cold timings)."""
    tilted_moments.cache_clear()
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


def composed_moments(history: Sequence[Sequence[float]], t: float, direction: str) -> ComposedMoments | None:
    """``K(t) = sum n_j K_j(t)`` and friends for the composition (independent steps under ``P_t``)."""
    vals = np.zeros(7)
    for sigma, q, n in history:
        m = tilted_moments(float(q), float(sigma), float(t), direction)
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
    c = composed_moments(history, t, direction)
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
