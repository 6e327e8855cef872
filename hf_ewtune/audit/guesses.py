"""From canary scores to the audited epsilon: guess the most confident canaries, count, bound.

Higher score = "more likely included". The auditor guesses "included" for the ``k_in`` highest scores and
"excluded" for the ``k_out`` lowest, abstaining on the rest (paper, Section 6). Which ``(k_in, k_out)`` works
best depends on the mechanism, so a small fixed grid (:data:`GUESS_FRACTIONS`, top-only and top-and-bottom) is
tried and every bound is taken at confidence ``1 - (1 - confidence) / len(grid)`` (Bonferroni): the largest
of them is then a valid lower bound at ``confidence``.

Example:
    >>> import numpy as np
    >>> included = np.array([True, False] * 50)
    >>> res = audit_scores(scores=np.where(included, 1.0, 0.0), included=included, delta=0.0)
    >>> res.num_correct == res.num_guesses and res.epsilon_lower > 1
    True
    >>> audit_scores(scores=np.zeros(100), included=included, delta=0.0).epsilon_lower
    0.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from hf_ewtune.audit.bound import epsilon_lower_bound
from hf_ewtune.errors import PrivacyConfigError

# Guesses "included" for the top fraction f of the canaries; paired with the bottom fraction f too ("both").
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)


@dataclass(frozen=True)
class GuessResult:
    """The best (largest-bound) guessing rule of the grid and what it gave.

    Attributes:
        epsilon_lower: The empirical lower bound on epsilon at ``confidence`` (Bonferroni over the grid).
        confidence: The stated confidence.
        num_canaries: m.
        num_guesses: r of the best rule.
        num_correct: v of the best rule.
        guessed_in: k_in of the best rule (top scores guessed included).
        guessed_out: k_out of the best rule (bottom scores guessed excluded).
        rules_tried: Size of the grid (the Bonferroni factor).
    """

    epsilon_lower: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    guessed_in: int
    guessed_out: int
    rules_tried: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def guess_rules(*, num_canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The ``(k_in, k_out)`` grid: for each fraction f, top-only and top-and-bottom (duplicates dropped)."""
    rules: list[tuple[int, int]] = []
    for f in fractions:
        k = max(1, int(round(f * num_canaries)))
        for rule in ((k, 0), (k, min(k, num_canaries - k))):
            if rule not in rules and rule[0] + rule[1] <= num_canaries:
                rules.append(rule)
    return rules


def audit_scores(
    *, scores: Any, included: Any, delta: float, confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> GuessResult:
    """Guess inclusion from ``scores`` and return the best one-run bound over the grid of rules.

    Ties are broken by a fixed random permutation (seeded, so that equal scores are not ranked by position,
    which could correlate with inclusion).

    Args:
        scores: ``m`` canary scores (higher = more likely included).
        included: ``m`` booleans, the true inclusion.
        delta: The delta of the audited guarantee.
        confidence: Overall confidence, e.g. 0.95.
        fractions: Fractions of ``m`` guessed "included" (see :func:`guess_rules`).

    Returns:
        A :class:`GuessResult`.

    Raises:
        PrivacyConfigError: mismatched lengths, fewer than 2 canaries or non-finite scores.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    m = s.shape[0]
    if inc.shape[0] != m:
        raise PrivacyConfigError(f"scores ({m}) and included ({inc.shape[0]}) must have the same length.")
    if m < 2:
        raise PrivacyConfigError(f"need at least 2 canaries, got {m}.")
    if not np.all(np.isfinite(s)):
        raise PrivacyConfigError("canary scores must be finite (training diverged?).")
    if not 0.0 < confidence < 1.0:
        raise PrivacyConfigError(f"confidence must be in (0, 1), got {confidence!r}.")
    tie_break = np.random.default_rng(0).permutation(m)
    order = np.lexsort((tie_break, -s))  # descending score, ties by the fixed permutation
    rules = guess_rules(num_canaries=m, fractions=fractions)
    per_rule_confidence = 1.0 - (1.0 - confidence) / len(rules)
    best: GuessResult | None = None
    for k_in, k_out in rules:
        top, bottom = order[:k_in], order[m - k_out:] if k_out else order[:0]
        correct = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = epsilon_lower_bound(num_canaries=m, num_guesses=k_in + k_out, num_correct=correct, delta=delta,
                                  confidence=per_rule_confidence)
        if best is None or eps > best.epsilon_lower:
            best = GuessResult(eps, confidence, m, k_in + k_out, correct, k_in, k_out, len(rules))
    assert best is not None
    return best
