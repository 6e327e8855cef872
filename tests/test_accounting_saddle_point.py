"""Saddle-point accountant (Alghamdi et al., ICML 2023): estimate, certified bound, accountant, compare rows."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from hf_ewtune import cli
from hf_ewtune.accounting import SaddlePointAccountant, accountant_from_state, make_accountant
from hf_ewtune.accounting.compare import compare_accountants
from hf_ewtune.accounting.pld_lower import optimistic_pld_epsilon
from hf_ewtune.accounting.saddle_point import clear_caches, composed_moments, spa_epsilon, tilted_moments
from hf_ewtune.accounting.saddle_point_bound import spa_bound
from hf_ewtune.errors import PrivacyConfigError

# dp-accounting 0.6.0 PLD (pessimistic, connect-the-dots, value discretization 1e-4) at the paper's setting.
PAPER_SETTING = [(2.0, 0.01, 3000)]
PLD_PAPER = 1.1195732375931875


def _random_grid(seed: int, size: int):
    """Fine-tuning settings: 10-50,000 steps, q 1e-4-0.2, delta 1e-9-1e-5, sigma 0.7-5 (log-uniform)."""
    rng = np.random.default_rng(seed)
    for _ in range(size):
        n = int(round(10 ** rng.uniform(1, math.log10(50_000))))
        q = float(10 ** rng.uniform(-4, math.log10(0.2)))
        delta = float(10 ** rng.uniform(-9, -5))
        sigma = float(10 ** rng.uniform(math.log10(0.7), math.log10(5.0)))
        yield [(sigma, q, n)], delta


def test_upper_bound_never_below_optimistic_pld_on_untuned_random_grid():
    logging.disable(logging.WARNING)  # dp-accounting warns that privacy buckets replace connect-the-dots
    try:
        grid = list(_random_grid(seed=915_2023, size=17))
        # three heterogeneous histories (sigma and q change during the run)
        grid += [
            ([(1.0, 0.01, 400), (2.0, 0.02, 600)], 1e-6),
            ([(0.8, 0.005, 2000), (1.5, 0.05, 100), (3.0, 0.1, 50)], 1e-8),
            ([(1.2, 0.2, 20), (0.9, 0.001, 5000)], 1e-5),
        ]
        for history, delta in grid:
            upper = spa_bound(history, delta).epsilon
            lower = optimistic_pld_epsilon(history, delta, value_discretization_interval=1e-4)
            assert upper >= lower, (history, delta, upper, lower)
            assert upper > 0
    finally:
        logging.disable(logging.NOTSET)


def test_estimate_and_bound_at_the_paper_setting():
    """sigma = 2, q = 0.01, 3,000 steps (the paper's Figure setting; it gives a plot, so PLD is the reference)."""
    estimate = spa_epsilon(PAPER_SETTING, 1e-5)
    assert estimate == pytest.approx(PLD_PAPER, rel=2e-3)
    assert spa_epsilon(PAPER_SETTING, 1e-5, method="msd") == pytest.approx(PLD_PAPER, rel=2e-2)
    bound = spa_bound(PAPER_SETTING, 1e-5).epsilon
    assert PLD_PAPER * 0.999 <= bound <= PLD_PAPER * 1.02


def test_tilted_moments_match_the_gaussian_closed_form_within_their_error_radii():
    # q = 1: L ~ N(mu^2/2, mu^2) under P in both directions; tilting by t gives N((t + 1/2) mu^2, mu^2)
    # and K(t) = t (t + 1) mu^2 / 2.
    for sigma, t, direction in [(1.0, 0.5, "remove"), (0.5, 3.0, "add"), (2.0, 10.0, "remove")]:
        mu2 = 1.0 / sigma**2
        m = tilted_moments(1.0, sigma, t, direction)
        assert abs(m.log_mgf - t * (t + 1) * mu2 / 2) <= m.log_mgf_err
        assert abs(m.mean - (t + 0.5) * mu2) <= m.mean_err
        assert abs(m.var - mu2) <= m.var_err
        exact_abs3 = 2.0 * math.sqrt(2.0 / math.pi) * mu2**1.5
        assert exact_abs3 <= m.abs3 <= exact_abs3 * (1 + 1e-6)
        assert 0 < m.mean_err < 1e-8 * max(1.0, m.mean)


def _gaussian_exact_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018)."""

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 100.0, xtol=1e-12)


def test_bound_is_above_the_exact_gaussian_epsilon_without_subsampling():
    for sigma, n, delta in [(5.0, 100, 1e-5), (10.0, 1000, 1e-9), (3.0, 10, 1e-6)]:
        exact = _gaussian_exact_epsilon(math.sqrt(n) / sigma, delta)
        bound = spa_bound([(sigma, 1.0, n)], delta).epsilon
        # Berry-Esseen does not know the summands are Gaussian: its error shrinks like 1/sqrt(n)
        assert exact <= bound <= exact * (1.10 if n < 100 else 1.03), (sigma, n, delta, exact, bound)
        assert spa_epsilon([(sigma, 1.0, n)], delta) == pytest.approx(exact, rel=1e-2)


def test_query_work_is_independent_of_the_number_of_steps():
    calls = {}
    for steps in (10, 50_000):
        clear_caches()
        spa_bound([(1.0, 0.01, steps)], 1e-6)
        calls[steps] = tilted_moments.cache_info().misses
    assert max(calls.values()) <= 60, calls  # a fixed budget of tilts, never a loop over steps


def test_heterogeneous_bound_is_consistent_with_the_merged_history():
    merged = spa_bound([(2.0, 0.01, 3000)], 1e-6).epsilon
    split = spa_bound([(2.0, 0.01, 1000), (2.0, 0.01, 2000)], 1e-6).epsilon  # non-iid Berry-Esseen constant
    assert merged < split <= merged * 1.02
    c = composed_moments([(1.0, 0.01, 400), (1.0, 0.01, 600)], 2.0, "remove")
    assert c.segments == 2 and c.log_mgf == pytest.approx(composed_moments([(1.0, 0.01, 1000)], 2.0, "remove").log_mgf)


def test_accountant_publishes_the_smallest_certified_value_with_its_label():
    # q * steps small: the tilted loss is far from Gaussian and the bound is loose; PLD is published.
    history, delta = (1.11, 6.28e-4, 90), 2.4e-8
    acc = SaddlePointAccountant()
    acc.step(noise_multiplier=history[0], sample_rate=history[1], num_steps=history[2])
    bound = acc.upper_bound(delta)
    eps = acc.get_epsilon(delta)
    assert eps < bound
    assert "PLD" in acc.certified_by_for(delta)
    assert acc.get_privacy_spent(delta).certified_by == acc.certified_by_for(delta)
    only_bound = SaddlePointAccountant(fallback="none")
    only_bound.load_state_dict({**acc.state_dict(), "options": {}})
    assert only_bound.get_epsilon(delta) == pytest.approx(bound)
    assert only_bound.certified_by_for(delta).startswith("saddle-point")


def test_accountant_registry_state_and_errors():
    acc = make_accountant("spa", tolerance=0.05)
    assert isinstance(acc, SaddlePointAccountant) and acc.name == "saddle_point"
    acc.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=3000)
    restored = accountant_from_state(json.loads(json.dumps(acc.state_dict())))
    assert isinstance(restored, SaddlePointAccountant) and restored.tolerance == 0.05
    assert restored.history == [(2.0, 0.01, 3000)]
    assert restored.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    with pytest.raises(PrivacyConfigError, match="fallback"):
        SaddlePointAccountant(fallback="moments")
    with pytest.raises(PrivacyConfigError, match="tolerance"):
        SaddlePointAccountant(tolerance=-1.0)
    with pytest.raises(PrivacyConfigError, match="method"):
        acc.estimate_epsilon(1e-5, method="lugannani")
    empty = SaddlePointAccountant()
    assert empty.get_epsilon(1e-5) == 0.0
    empty.step(noise_multiplier=0.0, sample_rate=0.1, num_steps=3)
    assert empty.get_epsilon(1e-5) == math.inf


def test_compare_and_cli_show_the_saddle_point_rows(capsys):
    rows = {r.method: r for r in compare_accountants(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)}
    assert rows["Saddle-point SPA-CLT"].kind == "estimate" and rows["Saddle-point SPA-MSD"].kind == "estimate"
    assert rows["Saddle-point bound"].kind == "certified"
    assert rows["Saddle-point bound"].epsilon >= rows["PLD (default)"].epsilon * 0.999
    assert rows["Saddle-point SPA-CLT"].epsilon == pytest.approx(rows["PLD (default)"].epsilon, rel=0.01)
    argv = ["epsilon", "--accountant", "saddle_point", "--noise-multiplier", "2", "--sample-rate", "0.01",
            "--steps", "3000", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accountant"] == "saddle_point"
    assert report["epsilon"] == pytest.approx(PLD_PAPER, rel=0.02)
