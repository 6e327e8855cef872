"""The one-run lower bound on epsilon (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv 2305.08846).

Setting: ``m`` canaries, each included in the training set independently with probability 1/2. After
training, an auditor looks at the output and makes ``r`` guesses ("included" / "excluded"), abstaining on the
other ``m - r`` canaries; ``v`` of the guesses are correct. The paper's main theorem for (eps, delta)-DP
(Theorem 5.2 there; their reference code ``p_value_DP_audit``): if the training run is (eps, delta)-DP, then
for every ``v``

    P[#correct >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_{i=1..v} P[v - i <= Binomial(r, p) < v] / i,

with ``p = e^eps / (1 + e^eps)`` (the accuracy of eps-randomized response). So observing ``v`` correct
guesses rejects "(eps, delta)-DP" at level ``1 - confidence`` whenever that right-hand side (the p-value)
is below ``1 - confidence``. :func:`epsilon_lower_bound` returns the largest such eps: with probability at
least ``confidence`` over the run, a mechanism that really is (eps, delta)-DP never yields a bound above eps.

Example:
    >>> round(epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=100, delta=0.0), 3)
    3.493
    >>> epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=50, delta=1e-5)
    0.0
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from hf_ewtune.errors import PrivacyConfigError

# Binary-search iterations (the bracket starts at width <= 64, so the result is within 1e-12 of the supremum).
_ITERATIONS = 60


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses), ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise PrivacyConfigError(f"{name} must be an integer >= 0, got {value!r}.")
    if not num_correct <= num_guesses <= num_canaries:
        raise PrivacyConfigError(
            f"need num_correct <= num_guesses <= num_canaries, got num_correct={num_correct}, "
            f"num_guesses={num_guesses}, num_canaries={num_canaries}."
        )


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``num_correct`` correct guesses out of ``num_guesses`` under (eps, delta)-DP.

    Args:
        num_canaries: m, the canaries (each included with probability 1/2).
        num_guesses: r, the guesses made (abstentions excluded).
        num_correct: v, the correct guesses.
        epsilon: The null hypothesis' epsilon (>= 0).
        delta: The null hypothesis' delta (in [0, 1]).

    Returns:
        The p-value, capped at 1.

    Example:
        >>> p_value(num_canaries=10, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0) == 0.5 ** 10
        True
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not epsilon >= 0 or math.isnan(epsilon):
        raise PrivacyConfigError(f"epsilon must be >= 0, got {epsilon!r}.")
    if not 0.0 <= delta <= 1.0:
        raise PrivacyConfigError(f"delta must be in [0, 1], got {delta!r}.")
    v, r = int(num_correct), int(num_guesses)
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    alpha = 0.0
    if delta > 0:
        # P[v - i <= Binomial(r, p) < v] for i = 1..v, divided by i.
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + 2.0 * num_canaries * delta * alpha, 1.0)


def epsilon_lower_bound(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest eps that ``num_correct`` correct guesses out of ``num_guesses`` reject at ``confidence``.

    A run that is (eps, delta)-DP gives a bound above eps with probability at most ``1 - confidence``.
    Returns 0 when nothing is rejected (e.g. accuracy at chance).

    Args:
        num_canaries: m, the canaries (each included with probability 1/2).
        num_guesses: r, the guesses made.
        num_correct: v, the correct guesses.
        delta: The delta of the guarantee being audited (the run's certified delta).
        confidence: In (0, 1), e.g. 0.95.

    Returns:
        The empirical lower bound on epsilon (0 when nothing is rejected).

    Raises:
        PrivacyConfigError: counts out of range, ``delta`` not in [0, 1] or ``confidence`` not in (0, 1).

    Example:
        >>> # all r guesses right, delta = 0: p^r = 0.05 gives eps = ln(p / (1 - p))
        >>> p = 0.05 ** (1 / 20)
        >>> abs(epsilon_lower_bound(num_canaries=20, num_guesses=20, num_correct=20, delta=0.0)
        ...     - math.log(p / (1 - p))) < 1e-9
        True
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not 0.0 < confidence < 1.0:
        raise PrivacyConfigError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}.")
    if not 0.0 <= delta <= 1.0:
        raise PrivacyConfigError(f"delta must be in [0, 1], got {delta!r}.")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct,
                       epsilon=eps, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # terminates: p -> 1 as eps grows, so the p-value tends to >= P[Bin(r, 1) >= v] = 1
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            return lo
    for _ in range(_ITERATIONS):
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo
