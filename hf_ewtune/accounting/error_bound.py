"""Explicit uniform bound on the error of the first-order Edgeworth expansion (iid sums).

Derumigny, Girard & Guyonvarch, "Explicit non-asymptotic bounds for the distance to the first-order
Edgeworth expansion", Sankhya A (2023), arXiv:2101.05780: Theorem 2.1 under the iid, moment-only
("no continuity") assumption, skewed case (Appendix A.3, Eq. (17) with the remainder of Eq. (21)).
Clean-room transcription of the formulas. For iid centred summands with variance B^2::

    sup_x | P(S_n <= x) - Phi(x) - lambda3 / (6 sqrt(n)) (1 - x^2) phi(x) | <= Delta_n(eps)

for every free parameter eps in (0, 1/3); we take the minimum over a grid of eps. Inputs are the
*centred* moment ratios of one summand: K4 = E d^4 / B^4, K3 = E|d|^3 / B^3, lambda3 = E d^3 / B^3 and
K3tilde = K3 + E|d| / B (d = L - E L).

The bound is O(n^{-1/2}) with large constants: at DP-SGD deltas (<= 1e-3) it is always far larger
than delta, so it essentially never certifies an epsilon there (it is reported, never relied on).

Cross-checks: against the formulas of the authors' R package ``BoundEdgeworth`` (``Bound_EE1`` with
``continuity = FALSE, iid = TRUE, no_skewness = FALSE``; version 0.1.1.01, commit ea945b0) every term
agrees to rounding error except e_3(eps), where the package evaluates eps^2 / (2 (1 - 3 eps))^2 and we
keep the larger eps^2 / (2 (1 - 3 eps)^2); with its positive net coefficient (0.037 - 1.306/36) this makes
our bound larger by at most ~2e-4 relative (conservative). For the README example (n = 1000, K4 = 9,
default moment bounds, eps = 0.1) the package's current code gives 0.1645074 and we give 0.1645074; the
README prints 0.1626857, which the current code does not reproduce (presumably rendered from an
earlier package version). See
``tests/test_accounting_error_bound_reference.py``. The values in the design note (from the Edgeworth
Accountant's reference code, which uses a different, earlier form of the bound and uncentred moments)
are 2-3x smaller than ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gamma as _gamma
from scipy.special import gammaincc

from .cumulants import LawMoments

CST_PSI = 1.0253  # |Psi(t)| <= 1.0253 / (2 pi |t|)
EPS_PARAM_GRID = np.linspace(0.01, 0.32, 63)


def _upper_gamma(a: float, x: float) -> float:
    """Upper incomplete gamma Gamma(a, x) = int_x^inf u^(a-1) e^-u du (a > 0)."""
    return float(_gamma(a) * gammaincc(a, max(x, 0.0)))


def _e3(eps: float) -> float:
    # The larger of the two readings of e_3(eps) found in the literature/code (conservative).
    return math.exp(eps**2 / 6.0 + eps**2 / (2.0 * (1.0 - 3.0 * eps) ** 2))


def _p2n(eps: float, n: float, k4: float, lam3: float) -> float:
    return (
        48.0 * eps * math.sqrt(k4 / n)
        + 4.0 * eps**2 * k4 / n
        + 96.0 * math.sqrt(2.0 * eps) * abs(lam3) / (k4**0.25 * n**0.25)
        + 32.0 * eps * lam3**2 / math.sqrt(k4 * n)
        + 16.0 * math.sqrt(2.0) * k4**0.25 * abs(lam3) * eps**1.5 / n**0.75
    )


def _e2n(eps: float, n: float, k4: float, lam3: float) -> float:
    p2 = _p2n(eps, n, k4, lam3)
    c = (1.0 - 3.0 * eps) ** 2
    return math.exp(eps**2 * (1.0 / 6.0 + 1.0 / (2.0 * c) + 2.0 * p2 / (576.0 * c)))


def _rn_iid_integrated(eps: float, n: float, k4: float, lam3: float) -> float:
    c = (1.0 - 3.0 * eps) ** 2
    denom = 2.0 * c * math.pi
    a2 = CST_PSI / denom * k4 / (24.0 * n**2) * 2**3 * _gamma(5)
    a5 = CST_PSI / denom * k4**2 / (576.0 * n**3) * 2**4 * _gamma(6)
    e2 = _e2n(eps, n, k4, lam3)
    p2 = _p2n(eps, n, k4, lam3)
    bracket = k4 / 12.0 + 1.0 / (4.0 * c) + p2 / (576.0 * c)
    a6 = CST_PSI / math.pi * e2 / (8.0 * n**2) * bracket * 2**4 * _gamma(6)
    a1 = CST_PSI / denom * abs(lam3) / (6.0 * n**1.5) * 2**0.5 * _gamma(2.5)
    a3 = CST_PSI / denom * lam3**2 / (36.0 * n**2) * 2**3 * _gamma(5)
    a4 = CST_PSI / denom * k4 * abs(lam3) / (72.0 * n**2.5) * 2**3.5 * _gamma(5.5)
    a7 = CST_PSI / math.pi * e2 * abs(lam3) / (12.0 * n**1.5) * bracket * 2**3.5 * _gamma(5.5)
    return float(a1 + a2 + a3 + a4 + a5 + a6 + a7)


def dgg_bound_iid(*, n: int, k4: float, k3: float, k3tilde: float, lambda3: float, eps: float) -> float:
    """Delta_n(eps) of Derumigny-Girard-Guyonvarch (iid, no continuity assumption, skewed case)."""
    if not 0.0 < eps < 1.0 / 3.0:
        raise ValueError("eps must be in (0, 1/3)")
    n = float(n)
    c = (1.0 - 3.0 * eps) ** 2
    main = 0.1995 * k3tilde / math.sqrt(n) + (0.031 * k3tilde**2 + 0.327 * k4 * (1.0 / 12.0 + 1.0 / (4.0 * c))) / n
    skew = (0.054 * abs(lambda3) * k3tilde + 0.037 * _e3(eps) * lambda3**2) / n
    m = min(math.sqrt(2.0 * eps) * (n / k4) ** 0.25, 2.0 * math.sqrt(n) / k3tilde)
    upper = 2.0 * math.sqrt(n) / k3tilde
    rem = (
        (14.1961 + 67.0415) * k3tilde**4 / (16.0 * math.pi**4 * n**2)
        + 4.3394 * abs(lambda3) * k3tilde**3 / (8.0 * math.pi**3 * n**2)
        + _rn_iid_integrated(eps, n, k4, lambda3)
        + 1.306 * (_e2n(eps, n, k4, lambda3) - _e3(eps)) * lambda3**2 / (36.0 * n)
        + abs(lambda3) * (_upper_gamma(1.5, m) - _upper_gamma(1.5, upper)) / math.sqrt(n)
        + CST_PSI * 2**2.5 * k3 / (3.0 * math.pi * math.sqrt(n))
        * (_upper_gamma(1.5, m * m / 8.0) - _upper_gamma(1.5, 4.0 * n / (8.0 * k3tilde**2)))
    )
    return float(main + skew + max(rem, 0.0))


@dataclass(frozen=True)
class MomentRatios:
    """Centred moment ratios of one summand used by the bound."""

    k3: float
    k3tilde: float
    k4: float
    lambda3: float


def moment_ratios(law: LawMoments) -> MomentRatios:
    """Moment ratios (K3, K3tilde, K4, lambda3) from the centred moments of one PLLR summand."""
    b = math.sqrt(law.kappa2)
    return MomentRatios(
        k3=law.abs3 / b**3,
        k3tilde=law.abs3 / b**3 + law.abs1 / b,
        k4=law.central4 / b**4,
        lambda3=law.central3 / b**3,
    )


def uniform_error_bound(law: LawMoments, n: int) -> float:
    """Smallest Delta_n over the free parameter grid, for ``n`` iid copies of the summand ``law``.

    Example:
        >>> from hf_ewtune.accounting.cumulants import step_cumulants
        >>> 0 < uniform_error_bound(step_cumulants(0.01, 1.0).x, 1000) < 1
        True
    """
    if not law.kappa2 > 0 or n < 1:
        return math.inf
    r = moment_ratios(law)
    best = math.inf
    for e in EPS_PARAM_GRID:
        try:
            value = dgg_bound_iid(n=n, k4=r.k4, k3=r.k3, k3tilde=r.k3tilde, lambda3=r.lambda3, eps=float(e))
        except (OverflowError, ZeroDivisionError, ValueError):
            continue  # this free parameter gives an infinite (vacuous) bound
        if math.isfinite(value):
            best = min(best, value)
    return best
