"""The one-run lower bound (hf_ewtune.audit.bound) against values derived by hand, and its validity."""

import math

import numpy as np
import pytest
from scipy import stats

from hf_ewtune.audit import audit_scores, epsilon_lower_bound, p_value
from hf_ewtune.audit.guesses import guess_rules
from hf_ewtune.errors import PrivacyConfigError


def _all_correct_epsilon(r: int, level: float = 0.05) -> float:
    # delta = 0, v = r: the p-value is p^r, so the bound solves p^r = level, eps = ln(p / (1 - p))
    p = level ** (1.0 / r)
    return math.log(p / (1.0 - p))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_correct_without_delta_matches_closed_form(r):
    eps = epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r, delta=0.0)
    assert eps == pytest.approx(_all_correct_epsilon(r), abs=1e-9)


def test_hand_values():
    # r = 100, all right: p = 0.05^(1/100) = 0.970487..., eps = ln(32.88) = 3.4930
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=100, delta=0.0) == pytest.approx(3.4930, abs=1e-3)
    # 99% confidence: p = 0.01^(1/100), p = 0.954998, eps = ln(21.221) = 3.0549
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=100, delta=0.0,
                               confidence=0.99) == pytest.approx(3.0549, abs=1e-3)


def test_chance_accuracy_gives_zero():
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=500, num_correct=250, delta=1e-5) == 0.0
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=500, num_correct=260, delta=1e-5) == 0.0  # not significant
    assert epsilon_lower_bound(num_canaries=10, num_guesses=0, num_correct=0, delta=0.0) == 0.0


def test_p_value_at_epsilon_zero_is_the_fair_coin_tail():
    assert p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0) == pytest.approx(2 ** -10)
    expected = stats.binom.sf(59, 100, 0.5)
    assert p_value(num_canaries=200, num_guesses=100, num_correct=60, epsilon=0.0, delta=0.0) == pytest.approx(expected)


def test_delta_correction_matches_the_theorem_and_only_lowers_the_bound():
    m, r, v, eps, delta = 1000, 100, 90, 1.0, 1e-4
    p = 1 / (1 + math.exp(-eps))
    alpha = max(sum(stats.binom.pmf(v - j, r, p) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    expected = stats.binom.sf(v - 1, r, p) + 2 * m * delta * alpha
    assert p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) == pytest.approx(expected)
    no_delta = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=0.0)
    with_delta = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta)
    assert 0 < with_delta < no_delta


def test_more_correct_guesses_never_lower_the_bound():
    bounds = [epsilon_lower_bound(num_canaries=500, num_guesses=200, num_correct=v, delta=1e-5) for v in range(100, 201, 10)]
    assert bounds == sorted(bounds) and bounds[-1] > 3


@pytest.mark.parametrize("kwargs", [
    dict(num_canaries=10, num_guesses=11, num_correct=5),
    dict(num_canaries=10, num_guesses=5, num_correct=6),
    dict(num_canaries=10, num_guesses=5, num_correct=-1),
    dict(num_canaries=10, num_guesses=5, num_correct=5, confidence=1.0),
    dict(num_canaries=10, num_guesses=5, num_correct=5, delta=2.0),
])
def test_bad_counts_name_the_argument(kwargs):
    kwargs = {"delta": 0.0, **kwargs}
    with pytest.raises(PrivacyConfigError, match="num_|confidence|delta"):
        epsilon_lower_bound(**kwargs)


def test_the_bound_is_valid_for_an_exactly_dp_mechanism():
    # eps-randomized response on each canary is exactly eps-DP: the 95% bound may exceed eps in <= 5% of runs.
    eps, m, runs = 1.0, 300, 60
    rng = np.random.default_rng(0)
    keep = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for _ in range(runs):
        included = rng.random(m) < 0.5
        answers = np.where(rng.random(m) < keep, included, ~included)
        bound = epsilon_lower_bound(num_canaries=m, num_guesses=m, num_correct=int((answers == included).sum()), delta=0.0)
        above += bound > eps
    assert above <= 8  # expected <= 3; P[Binomial(60, 0.05) > 8] < 0.3%


def test_guessing_grid_pays_bonferroni_and_finds_a_perfect_split():
    included = np.arange(400) % 2 == 0
    perfect = audit_scores(scores=np.where(included, 1.0, -1.0), included=included, delta=0.0)
    assert perfect.num_correct == perfect.num_guesses == 400  # top and bottom halves, all right
    assert perfect.rules_tried == len(guess_rules(num_canaries=400))
    per_rule = 1 - 0.05 / perfect.rules_tried
    assert perfect.epsilon_lower == pytest.approx(_all_correct_epsilon(400, 1 - per_rule), abs=1e-9)


def test_tied_scores_are_not_ranked_by_position():
    # all scores equal: ranking by position would guess the first k (all included here) and find a bound
    included = np.arange(200) < 100
    assert audit_scores(scores=np.zeros(200), included=included, delta=0.0).epsilon_lower < 0.5


def test_scores_must_be_finite_and_match_the_canaries():
    with pytest.raises(PrivacyConfigError, match="same length"):
        audit_scores(scores=np.zeros(3), included=np.zeros(4, dtype=bool), delta=0.0)
    with pytest.raises(PrivacyConfigError, match="finite"):
        audit_scores(scores=np.array([0.0, np.nan]), included=np.array([True, False]), delta=0.0)
