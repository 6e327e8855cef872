"""The saddle-point accountant's numerical inputs carry PROVEN error radii (tilted_quadrature.py)."""

from __future__ import annotations

import itertools
import logging
import math

import mpmath as mp
import pytest
from scipy.stats import norm

from hf_ewtune.accounting import SaddlePointAccountant
from hf_ewtune.accounting.pld_lower import optimistic_pld_epsilon
from hf_ewtune.accounting.saddle_point import tilted_moments
from hf_ewtune.accounting.saddle_point_bound import spa_bound
from hf_ewtune.accounting.tilted_quadrature import tilt_exponent, tilted_integrals


def _gaussian_integrals(sigma, t, direction, anchor, peak):
    """Closed form at q = 1: z ~ N(c mu, 1) under the weight, D = +-(mu z - mu^2/2) - c0 ~ N(m, mu^2)."""
    mu = 1.0 / sigma
    c = tilt_exponent(t, direction)
    sgn = 1.0 if direction == "remove" else -1.0
    c0 = sgn * (mu * anchor - mu * mu / 2)
    i0 = math.sqrt(2 * math.pi) * math.exp(c * c * mu * mu / 2 - c * mu * mu / 2 - peak)
    m, s = sgn * (c * mu * mu - mu * mu / 2) - c0, mu
    a = m / s
    abs3 = s**3 * ((a**3 + 3 * a) * (1 - 2 * norm.cdf(-a)) + 2 * (a * a + 2) * norm.pdf(a))
    return [i0, i0 * m, i0 * (m * m + s * s), i0 * abs3]


@pytest.mark.parametrize(
    "sigma,t,direction,anchor",
    [(1.0, 0.5, "remove", 1.5), (0.5, 3.0, "add", -10.0), (2.0, 10.0, "remove", 2.0), (0.7, 40.0, "add", -55.0),
     (3.0, 200.0, "remove", 70.0), (1.3, 0.01, "add", 0.3)],
)
def test_tilted_integrals_contain_the_gaussian_closed_form(sigma, t, direction, anchor):
    r = tilted_integrals(1.0, sigma, t, direction, anchor)
    exact = _gaussian_integrals(sigma, t, direction, anchor, r.peak)
    for k, (value, radius, ref) in enumerate(zip(r.values, r.radii, exact)):
        assert abs(value - ref) <= radius, (k, value, ref, radius)
        # and the radius is useful: the analytic integrands are near machine precision, |D|^3 within 1e-5
        assert radius <= (1e-5 if k == 3 else 1e-9) * abs(ref) + 1e-12 * r.values[0], (k, radius, ref)


def _reference(q, sigma, t, direction, anchor, peak):
    """The four integrals by mpmath (tanh-sinh, 20 digits, split at the kink)."""
    mp.mp.dps = 20
    q, mu = mp.mpf(q), 1 / mp.mpf(sigma)
    c = tilt_exponent(t, direction)
    sgn = 1 if direction == "remove" else -1

    def ell(z):
        return mp.log(1 - q + q * mp.exp(mu * z - mu * mu / 2))

    c0 = sgn * ell(mp.mpf(anchor))
    pts = [-mp.inf] + sorted({mp.mpf(anchor)} | {mp.mpf(x) for x in range(-16, 17, 4)}) + [mp.inf]

    def w(z):
        return mp.exp(-z * z / 2 + c * ell(z) - peak)

    out = [mp.quad(lambda z: w(z) * (sgn * ell(z) - c0) ** k, pts) for k in (0, 1, 2)]
    return out + [mp.quad(lambda z: w(z) * abs(sgn * ell(z) - c0) ** 3, pts)]


@pytest.mark.parametrize("args", [(0.01, 1.0, 3.0, "remove", 1.0), (0.05, 0.8, 10.0, "add", -0.5)])
def test_tilted_integral_radii_cover_a_high_precision_reference(args):
    r = tilted_integrals(*args)
    reference = _reference(*args, r.peak)
    for k, (value, radius, ref) in enumerate(zip(r.values, r.radii, reference)):
        assert abs(value - float(ref)) <= radius, (k, value, float(ref), radius)


def test_tilted_moments_bracket_the_gaussian_cgf_at_q1_in_both_directions():
    for sigma, t in [(0.7, 2.0), (1.3, 25.0), (3.0, 0.2)]:
        mu2 = 1.0 / sigma**2
        for direction in ("remove", "add"):
            m = tilted_moments(1.0, sigma, t, direction)
            # add: L = -(mu z - mu^2/2), z ~ N(0,1): K(t) = t^2 mu^2/2 + t mu^2/2 = t(t+1) mu^2/2 as well
            assert abs(m.log_mgf - t * (t + 1) * mu2 / 2) <= m.log_mgf_err
            assert abs(m.mean - (t + 0.5) * mu2) <= m.mean_err
            assert abs(m.var - mu2) <= m.var_err
            exact_abs3 = 2.0 * math.sqrt(2.0 / math.pi) * mu2**1.5
            assert exact_abs3 <= m.abs3 <= exact_abs3 * (1 + 1e-5)


#: The issue's check grid, chosen before looking at any result (none of these values was used for tuning).
ISSUE_GRID = list(itertools.product((0.7, 1.3, 3.0), (3e-4, 0.03, 0.15), (37, 2000, 20000), (1e-5, 1e-8)))


def _check_against_optimistic_pld(settings):
    logging.disable(logging.WARNING)  # dp-accounting: privacy buckets instead of connect-the-dots
    try:
        for sigma, q, n, delta in settings:
            upper = spa_bound([(sigma, q, n)], delta).epsilon
            # optimistic PLD is a lower bound at ANY discretisation; 1e-3 keeps the big-epsilon settings affordable
            lower = optimistic_pld_epsilon([(sigma, q, n)], delta, value_discretization_interval=1e-3)
            assert upper >= lower, (sigma, q, n, delta, upper, lower)
    finally:
        logging.disable(logging.NOTSET)


def test_upper_bound_never_below_optimistic_pld_on_a_few_issue_settings():
    _check_against_optimistic_pld([(3.0, 0.03, 2000, 1e-8), (1.3, 3e-4, 20000, 1e-5), (0.7, 0.03, 37, 1e-5)])


@pytest.mark.slow
def test_upper_bound_never_below_optimistic_pld_on_the_issue_grid():
    _check_against_optimistic_pld(ISSUE_GRID)


def test_accountant_computes_the_fallback_when_the_estimate_is_infinite(monkeypatch):
    # old behaviour: `bound <= (1 + tol) * inf` counted as "tight", so a vacuous bound could be published
    import hf_ewtune.accounting.saddle_point_accountant as spa_mod

    monkeypatch.setattr(spa_mod, "spa_epsilon", lambda history, delta, method="clt": math.inf)
    monkeypatch.setattr(spa_mod, "spa_bound", lambda history, delta: type("B", (), {"epsilon": math.inf})())
    acc = SaddlePointAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    eps = acc.get_epsilon(1e-5)
    assert math.isfinite(eps) and "PLD" in acc.certified_by_for(1e-5)
