"""Integrals against the tilted density of one subsampled-Gaussian step, with PROVEN error radii.

One step (noise multiplier ``sigma``, ``mu = 1/sigma``, rate ``q``) has privacy loss ``L = +-ell(z)``,
``ell(z) = log(1 - q + q exp(mu z - mu^2/2))`` (increasing, ``0 <= ell' <= mu``). The saddle-point
accountant needs, at a tilt ``t``, the four integrals

    ``I_k = int exp(-z^2/2 + c ell(z) - peak) D(z)^k dz`` (``k = 0, 1, 2``) and ``I_3 = int ... |D(z)|^3 dz``,

with ``c = 1 + t`` (direction "remove") or ``-t`` ("add"), ``D = L - c0`` and the centre ``c0 = L(z*)``
for an anchor ``z*`` (a float). :func:`tilted_integrals` returns each computed value with a radius that
bounds its distance to the exact integral. The argument, term by term:

1. **Complex majorant.** For ``zeta = x + iy`` with ``theta = mu |y| < pi``, ``1 - q + q exp(mu zeta - mu^2/2)``
   is ``u + v e^{i mu y}`` with ``u = 1 - q >= 0``, ``v = q exp(mu x - mu^2/2) > 0``; its modulus lies in
   ``[(u + v) cos(theta/2), u + v]`` and its argument between 0 and ``mu y``. So
   ``|Re ell(zeta) - ell(x)| <= |log cos(theta/2)|``, ``|Im ell(zeta)| <= theta``, hence
   ``|D(zeta)| <= |D(x)| + r`` with ``r = theta + |log cos(theta/2)|``, and
   ``|exp(-zeta^2/2 + c ell(zeta))| <= exp(-x^2/2 + c ell(x)) E`` with
   ``E = exp(y^2/2) cos(theta/2)^(-max(0, -c))``. Every integrand (with ``D^3`` for ``|D|^3``) is analytic
   in the strip ``|Im| < rho`` (``mu rho < pi``; ``rho`` is :func:`strip_radius`).
2. **Majorant integrals** ``S_k >= int sup_{|zeta - x| <= rho} |f_k(zeta)| dx`` are upper Riemann sums over
   cells of width ``rho/4``: on a cell ``[a, b]`` the exponent is at most ``max(-z^2/2) + max(c ell(a),
   c ell(b))``, and at most an end value plus the cell width times the largest slope towards the other end
   (``(log w)' = -z + c mu s(z)``, ``s`` increasing); ``|D| <= max(|D(a)|, |D(b)|)`` (``ell`` is monotone),
   and the sup over every disk centred
   in a cell is the max over the 9 cells around it. Beyond the window (below) the exponent falls at
   rate ``>= H`` and ``|D|`` grows at rate ``<= mu``, which bounds the rest in closed form (item 4).
3. **Quadrature.** The integrals are trapezoid sums ``h sum_j f(z* + j h)`` over all ``j`` (the window
   part is summed, the rest is item 4). For ``k = 0, 1, 2`` the integrand is analytic in the strip, so
   ``|T - I| <= 2 S_k / (exp(2 pi rho / h) - 1)`` (Trefethen & Weideman, SIAM Review 56 (2014),
   Thm 5.1). ``|D|^3`` has one kink, at ``z*`` (``L`` is strictly monotone), which is a node; on each side
   it equals ``+-D^3`` (analytic). Euler-Maclaurin to order 2 on each half-line (``f = f' = f'' = 0`` at
   ``z*``) leaves the jump of ``f'''`` (``12 w(z*) |L'(z*)|^3``, ``|L'| = mu s``, ``s`` below) times ``h^4/720``
   plus a remainder at most ``h^4/720 int |f''''|``, and Cauchy's estimate on disks of radius ``rho``
   gives ``int |f''''| <= 24 S_3 / rho^4``: ``|T - I_3| <= h^4 w(z*) |L'(z*)|^3 / 60 + (h/rho)^4 S_3 / 30``.
4. **Truncation.** The window ``[lo, hi]`` puts ``H`` beyond every mode bound: ``(log w)' = -z + c ell'(z)``
   is ``<= -H`` right of ``hi = max(c, 0) mu + H`` and ``>= H`` left of ``lo`` (:func:`window`). So the
   nodes beyond the last summed node ``z_e`` add at most ``w(z_e) (|D(z_e)| + 1)^k / (H - k mu)`` per end
   (``A + mu s <= (A + 1) exp(mu s / (A + 1))``; ``H - 3 mu = 12``).
5. **Floating point.** ``mu = fl(1/sigma)``, the nodes ``fl(z* + j h)`` and every value are computed in
   IEEE double precision. Each computed ``ell`` is within ``16 u (1 + |mu z| + mu^2 + |ell| + |log q| +
   |log(1-q)| + q/(1-q))`` of the exact one (``u = 2^-53``; numpy's exp/log/log1p/expm1 are within a few
   ulp, and ``ell'(a) <= 1`` so errors of the argument pass through undamped at worst); exponents,
   products and powers carry a relative ``16 u`` per value; the node error ``|fl(z_j) - z_j|`` times
   ``sup |f'| <= S/rho`` (Cauchy) is added; and summation of ``n`` terms adds ``(n + 4) u sum |f_j|``
   (the worst case of any summation order).

All radii are sums of these terms, computed with a relative safety factor. They are rigorous under the
stated ulp accuracy of numpy's elementary functions; nothing is estimated from the numbers themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import expit

from .cumulants import pllr

U = 2.0**-53
ULPS = 16.0
#: Decay margin beyond the mode bounds is ``H = BASE_MARGIN + 3 mu`` (so ``H - 3 mu = BASE_MARGIN``).
BASE_MARGIN = 12.0
#: Trapezoid step ``h = rho / NODES_PER_RADIUS``: the ``|D|^3`` remainder is ``(h/rho)^4 S_3/30``.
NODES_PER_RADIUS = 48
#: Largest fine grid (points); beyond it no moments are returned (the tilt is skipped).
MAX_POINTS = 400_000
DEBUG = False


@dataclass(frozen=True)
class TiltedIntegrals:
    """``values[k]`` ~ ``I_k`` (module docstring), ``|values[k] - I_k| <= radii[k]``; ``c0`` within ``c0_err``."""

    peak: float
    c0: float
    c0_err: float
    values: tuple[float, float, float, float]
    radii: tuple[float, float, float, float]
    points: int


def tilt_exponent(t: float, direction: str) -> float:
    """``c`` of the tilted weight ``phi(z) exp(c ell(z))``: ``1 + t`` (remove: ``P`` is the mixture) or ``-t``."""
    return 1.0 + t if direction == "remove" else -t


def strip_radius(sigma: float, c: float) -> float:
    """Half-width ``rho`` of the strip/disks: ``theta = mu rho <= 2 < pi``, and ``<= 1`` when ``c < 0`` (then
    ``|1 + xi| >= 1 - theta s`` keeps ``|exp(c ell(zeta))|`` within ``exp(c ell(x)) (1-s)/(1-theta s) <= 1`` of the
    Gaussian part; see item 1)."""
    return min(1.0, (1.0 if c < 0.0 else 2.0) * sigma)


@lru_cache(maxsize=4096)
def window(q: float, sigma: float, c: float) -> tuple[float, float, float]:
    """``(lo, hi, H)``: ``(log w)'`` is ``<= -H`` right of ``hi`` and ``>= H`` left of ``lo`` (item 4).

    ``(log w)' = -z + c mu s(z)`` with ``0 <= s <= 1`` increasing, so ``hi = max(c, 0) mu + H`` and, for
    ``c >= 0``, ``lo = -H``. For ``c < 0`` (direction "add") any ``lo`` with ``-lo + c mu s(lo) >= H`` works
    (for ``z <= lo`` both terms only grow); it is found by bisection and checked with a margin, which keeps
    the window about ``2 H`` wide for large tilts instead of ``|c| mu``.
    """
    mu = 1.0 / sigma
    margin = BASE_MARGIN + 3.0 * mu
    lo, hi = min(c, 0.0) * mu - margin, max(c, 0.0) * mu + margin
    if c < 0.0:

        shift = math.log(q) - math.log1p(-q) if q < 1.0 else math.inf

        def ok(z: float) -> bool:
            x = mu * z - 0.5 * mu * mu + shift
            sig = 1.0 if x == math.inf else (1.0 / (1.0 + math.exp(-x)) if x > -700.0 else 0.0)
            return -z + c * mu * sig - margin >= 1e-6 * (1.0 + abs(z) - c * mu)

        a, b = lo, -margin
        if ok(b):
            return b, hi, margin
        while b - a > 0.05:
            m = 0.5 * (a + b)
            if ok(m):
                a = m
            else:
                b = m
        lo = a if ok(a) else lo
    return lo, hi, margin


def _ell_error(z: np.ndarray, ell: np.ndarray, q: float, mu: float) -> np.ndarray:
    base = 1.0 + np.abs(mu * z) + mu * mu + np.abs(ell)
    if q < 1.0:
        base = base + (abs(math.log(q)) + abs(math.log1p(-q)) + q / (1.0 - q))
    return ULPS * U * base


def _loss(z: np.ndarray, q: float, sigma: float, direction: str) -> tuple[np.ndarray, np.ndarray]:
    ell = pllr(z, sample_rate=q, noise_multiplier=sigma)
    return ell, (ell if direction == "remove" else -ell)


def _sigmoid(x: np.ndarray, q: float, mu: float) -> np.ndarray:
    """``s(x) = q e^a / (1 - q + q e^a)``, ``a = mu x - mu^2/2`` (so ``ell' = mu s``), increasing in ``x``."""
    if q >= 1.0:
        return np.ones_like(x)
    return expit(mu * x - 0.5 * mu * mu + math.log(q) - math.log1p(-q))


def _deviations(s: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds on ``|ell(zeta) - ell(x)|`` and ``|Re ell(zeta) - ell(x)|`` for ``|Im zeta| mu <= theta``
    when ``s(x) <= s`` (item 1): ``ell(zeta) - ell(x) = log(1 + xi)``, ``|xi| = 2 s |sin(Im / 2)| <= 2 s sin(theta/2)``."""
    log_cos = -math.log(math.cos(theta / 2.0))
    xi = 2.0 * s * math.sin(theta / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        series = np.where(xi < 1.0, -np.log1p(-np.minimum(xi, 0.999)), np.inf)
    return np.minimum(theta + log_cos, series) * (1.0 + 1e-9), np.minimum(log_cos, series) * (1.0 + 1e-9)


def _majorants(q, sigma, c, direction, lo, hi, margin, rho, peak, c0, c0_err) -> np.ndarray:
    """``S_k`` (k = 0..3) of item 2: upper bounds on ``int sup_{disk(x, rho)} |w D^k|``."""
    mu = 1.0 / sigma
    theta = mu * rho
    cell = rho / 4.0
    x = lo - 3.0 * rho + cell * np.arange(int(math.ceil((hi - lo + 6.0 * rho) / cell)) + 1)
    ell, loss = _loss(x, q, sigma, direction)
    ce = c * ell
    d = np.abs(loss - c0)
    a, b = x[:-1], x[1:]
    sig = _sigmoid(x, q, mu)
    r, re_dev = _deviations(sig[1:] * (1.0 + 1e-9), theta)
    # sup of log w = -z^2/2 + c ell on [a, b]: the smaller of (i) the two parts bounded apart and (ii) an end
    # value plus the largest slope towards the other end, (log w)' = -z + c mu s(z) in [-b + min, -a + max]
    neg_sq = np.where((a <= 0.0) & (b >= 0.0), 0.0, -0.5 * np.minimum(a * a, b * b))
    apart = neg_sq + np.maximum(ce[:-1], ce[1:])
    logw = -0.5 * x * x + ce
    cms = c * mu * sig
    slope_hi = -a + np.maximum(cms[:-1], cms[1:])
    slope_lo = -b + np.minimum(cms[:-1], cms[1:])
    from_a = logw[:-1] + np.maximum(slope_hi, 0.0) * cell
    from_b = logw[1:] + np.maximum(-slope_lo, 0.0) * cell
    log_sup = np.minimum(apart, np.minimum(from_a, from_b)) - peak + rho * rho / 2.0 + max(0.0, -c) * re_dev
    d_sup = np.maximum(d[:-1], d[1:]) + r + 2.0 * c0_err
    slack = 1e-6 * (1.0 + np.abs(log_sup) + abs(peak))
    cells = np.exp(log_sup + slack)[None, :] * (d_sup[None, :] * (1.0 + 1e-9)) ** np.arange(4)[:, None]
    m = cells.shape[1]
    disk = np.max(np.stack([cells[:, i:m - 8 + i] for i in range(9)]), axis=0)  # cells 4 .. m-5
    # every cell meeting [lo - rho, hi + rho] (overlap only over-counts); all of them have 4 cells each side
    inside = (b[4:m - 4] >= lo - rho) & (a[4:m - 4] <= hi + rho)
    total = cell * disk[:, inside].sum(axis=1)
    # beyond lo - rho / hi + rho: sup over the disk <= w(end) (|D(end)| + 2 mu rho + r)^k, decaying at rate H;
    # s is at most 1 there (right end) or s(lo) (left end)
    ends = np.array([lo, hi])
    ell_e, loss_e = _loss(ends, q, sigma, direction)
    r_e, re_e = _deviations(np.array([_sigmoid(np.array([lo]), q, mu)[0] * (1.0 + 1e-9), 1.0]), theta)
    log_e = -0.5 * ends * ends + c * ell_e - peak + rho * rho / 2.0 + max(0.0, -c) * re_e
    w_e = np.exp(log_e + 1e-6 * (1.0 + np.abs(log_e) + abs(peak)))
    a_e = np.abs(loss_e - c0) + 2.0 * mu * rho + r_e + 2.0 * c0_err + 1.0
    k = np.arange(4)
    tails = (w_e[None, :] * a_e[None, :] ** k[:, None]).sum(axis=1) / (margin - k * mu)
    return (total + tails) * (1.0 + 1e-6)


def tilted_integrals(
    sample_rate: float, noise_multiplier: float, t: float, direction: str, anchor: float
) -> TiltedIntegrals | None:
    """The four tilted integrals about ``c0 = L(anchor)`` with proven radii (module docstring, items 1-5).

    Returns None when the grid would exceed :data:`MAX_POINTS` or a value is not finite.

    Example:
        >>> r = tilted_integrals(1.0, 1.0, 0.5, "remove", 1.5)   # q = 1: Gaussian, D = z - 1.5
        >>> [round(v / r.values[0], 9) for v in r.values]          # E D = 0, E D^2 = 1, E|D|^3 = 2 sqrt(2/pi) = 1.5957691216
        [1.0, 0.0, 1.0, 1.595769123]
        >>> all(0 < e < 1e-6 * r.values[0] for e in r.radii)      # proven radii
        True
    """
    q, sigma, t = float(sample_rate), float(noise_multiplier), float(t)
    mu = 1.0 / sigma
    c = tilt_exponent(t, direction)
    lo, hi, margin = window(q, sigma, c)
    rho = strip_radius(sigma, c)
    h = rho / NODES_PER_RADIUS
    anchor = float(anchor)
    j_lo = int(math.floor((lo - anchor) / h)) - 1  # one node of margin: fl(z_j) stays beyond lo / hi
    j_hi = int(math.ceil((hi - anchor) / h)) + 1
    n = j_hi - j_lo + 1
    if n > MAX_POINTS:
        return None
    j = np.arange(j_lo, j_hi + 1, dtype=float)
    z = anchor + h * j
    ell, loss = _loss(z, q, sigma, direction)
    ell_a, loss_a = _loss(np.array([anchor]), q, sigma, direction)
    c0 = float(loss_a[0])
    c0_err = float(_ell_error(np.array([anchor]), ell_a, q, mu)[0])
    logw = -0.5 * z * z + c * ell
    peak = float(logw.max())
    w = np.exp(logw - peak)
    d = loss - c0
    ad = np.abs(d)
    powers = [np.ones_like(d), d, d * d, ad * ad * ad]
    f = [w * p for p in powers]
    values = np.array([h * float(fk.sum()) for fk in f])
    # item 5: floating point
    e_ell = _ell_error(z, ell, q, mu)
    e_logw = abs(c) * e_ell + ULPS * U * (1.0 + 0.5 * z * z + abs(c) * np.abs(ell) + abs(peak))
    rel_w = np.expm1(e_logw + ULPS * U) * 1.01
    e_d = e_ell + c0_err + ULPS * U * (np.abs(d) + abs(c0))
    d_up = ad + e_d
    fl_err = []
    for k, fk in enumerate(f):
        g_up = d_up**k * (1.0 + ULPS * U)
        e_g = g_up - ad**k if k else np.zeros_like(ad)
        e_elem = w * (e_g + g_up * rel_w) + ULPS * U * np.abs(fk)
        fl_err.append(h * float(e_elem.sum()) + (n + 4) * U * h * float(np.abs(fk).sum()))
    fl_err = np.array(fl_err) * (1.0 + 1e-6)
    s = _majorants(q, sigma, c, direction, lo, hi, margin, rho, peak, c0, c0_err)
    dz = 4.0 * U * (abs(anchor) + h * max(abs(j_lo), abs(j_hi)))
    node_err = 2.0 * s * dz / rho
    # item 4: nodes beyond the window, both ends
    k = np.arange(4)
    w_end = w[[0, -1]] * (1.0 + 2.0 * rel_w[[0, -1]])
    a_end = d_up[[0, -1]] + 1.0
    tail = (w_end[None, :] * a_end[None, :] ** k[:, None]).sum(axis=1) / (margin - k * mu)
    # item 3: quadrature
    quad = 2.0 * s / math.expm1(min(700.0, 2.0 * math.pi * rho / h))
    w_star = math.exp(min(700.0, -0.5 * anchor * anchor + c * float(ell_a[0]) - peak + 1e-6 * (1.0 + abs(peak))))
    slope = mu * min(1.0, float(_sigmoid(np.array([anchor]), q, mu)[0]) * (1.0 + 1e-9) + 1e-300)  # |L'(z*)|
    quad[3] = h**4 * w_star * slope**3 / 60.0 + (h / rho) ** 4 * s[3] / 30.0
    radii = (fl_err + node_err + tail + quad) * (1.0 + 1e-6)
    if DEBUG:
        print("values", values, "fl", fl_err, "node", node_err, "tail", tail, "quad", quad, "S", s)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(radii))):
        return None
    return TiltedIntegrals(
        peak=peak, c0=c0, c0_err=c0_err, values=tuple(float(v) for v in values),
        radii=tuple(float(e) for e in radii), points=n,
    )
