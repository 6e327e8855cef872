"""Cumulants of the privacy-loss log-likelihood ratio (PLLR) of one Poisson-subsampled Gaussian step.

Dominating pair (sensitivity 1, noise multiplier ``sigma``, ``mu = 1/sigma``, sampling rate ``q``)::

    P = N(0, 1)                    (dataset without the individual)
    Q = (1 - q) N(0, 1) + q N(mu, 1)   (dataset with the individual)
    L(z) = log dQ/dP(z) = log(1 - q + q exp(mu z - mu^2 / 2))

``X = L(xi), xi ~ P`` and ``Y = L(zeta), zeta ~ Q``. There is no closed form for their cumulants, so they
are integrated on a fixed uniform grid (trapezoid rule; the integrands are analytic with Gaussian
tails, so the rule converges exponentially) using *central* moments, which avoids the raw-moment
cancellation in kappa_4. Results are cached per ``(q, sigma)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GRID_HALF_WIDTH = 14.0
GRID_STEP = 2e-3


@dataclass(frozen=True)
class LawMoments:
    """Cumulants and centred absolute moments of one PLLR summand.

    Attributes:
        kappa1..kappa4: the first four cumulants.
        abs1: E|L - kappa1|; abs3: E|L - kappa1|^3; central3: E(L - kappa1)^3; central4: E(L - kappa1)^4.
    """

    kappa1: float
    kappa2: float
    kappa3: float
    kappa4: float
    abs1: float
    abs3: float
    central3: float
    central4: float


@dataclass(frozen=True)
class StepCumulants:
    """Cumulants of X (under P) and Y (under Q) for one step with parameters ``(q, sigma)``."""

    sample_rate: float
    noise_multiplier: float
    x: LawMoments
    y: LawMoments


def pllr(z: np.ndarray, *, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Privacy-loss log-likelihood ratio ``L(z)``, evaluated without overflow or cancellation.

    Example:
        >>> float(pllr(np.array([0.0]), sample_rate=1.0, noise_multiplier=1.0)[0])
        -0.5
    """
    q = float(sample_rate)
    mu = 1.0 / float(noise_multiplier)
    a = mu * np.asarray(z, dtype=float) - 0.5 * mu * mu
    if q >= 1.0:
        return a
    out = np.empty_like(a)
    small = a < 30.0
    # log1p(q * expm1(a)) is accurate for tiny q; the logaddexp form never overflows for large a.
    out[small] = np.log1p(q * np.expm1(a[small]))
    big = ~small
    out[big] = np.log1p(-q) + np.logaddexp(0.0, np.log(q / (1.0 - q)) + a[big])
    return out


def _law_moments(values: np.ndarray, weights: np.ndarray) -> LawMoments:
    # Plain ufunc reductions on purpose: np.dot goes through a multi-threaded BLAS, which is orders of
    # magnitude slower than a sum on a loaded machine.
    w = weights / weights.sum()
    k1 = float((w * values).sum())
    d = values - k1
    wd = w * d
    wd2 = wd * d
    c2 = float(wd2.sum())
    c3 = float((wd2 * d).sum())
    c4 = float((wd2 * d * d).sum())
    return LawMoments(
        kappa1=k1,
        kappa2=c2,
        kappa3=c3,
        kappa4=c4 - 3.0 * c2 * c2,
        abs1=float(np.abs(wd).sum()),
        abs3=float((np.abs(wd2 * d)).sum()),
        central3=c3,
        central4=c4,
    )


@lru_cache(maxsize=4096)
def step_cumulants(sample_rate: float, noise_multiplier: float) -> StepCumulants:
    """Cumulants of X and Y for one step (cached per ``(sample_rate, noise_multiplier)``).

    Args:
        sample_rate: Poisson sampling rate q in (0, 1].
        noise_multiplier: noise multiplier sigma > 0.

    Example:
        >>> c = step_cumulants(0.01, 1.0)
        >>> round(c.x.kappa2 * 1e4, 3)
        1.601
    """
    q = float(sample_rate)
    sigma = float(noise_multiplier)
    if not 0.0 < q <= 1.0 or not sigma > 0.0:
        raise ValueError(f"need 0 < sample_rate <= 1 and noise_multiplier > 0, got {q!r}, {sigma!r}")
    mu = 1.0 / sigma
    n = int(np.ceil((mu + 2.0 * GRID_HALF_WIDTH) / GRID_STEP)) + 1
    z = np.linspace(-GRID_HALF_WIDTH, mu + GRID_HALF_WIDTH, n)
    trap = np.ones(n)
    trap[0] = trap[-1] = 0.5
    phi = np.exp(-0.5 * z * z) * trap
    phi_shift = np.exp(-0.5 * (z - mu) ** 2) * trap
    values = pllr(z, sample_rate=q, noise_multiplier=sigma)
    x = _law_moments(values, phi)
    y = _law_moments(values, (1.0 - q) * phi / phi.sum() + q * phi_shift / phi_shift.sum())
    return StepCumulants(sample_rate=q, noise_multiplier=sigma, x=x, y=y)
