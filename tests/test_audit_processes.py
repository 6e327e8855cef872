"""Auditing every replica of a multi-process run (hf_ewtune.audit.processes), checked in one process.

The 2-process launch is tests/test_audit_two_processes.py (slow); here the pieces it relies on.
"""

import numpy as np
import pytest

from hf_ewtune.audit import AuditReport, audit_scores
from hf_ewtune.audit.processes import gather_scores, replicas_agree, shared_seed
from hf_ewtune.audit.run import _audit_replicas

INCLUDED = np.random.default_rng(0).random(400) < 0.5
NOISY = np.random.default_rng(1).normal(size=400) + 0.2 * INCLUDED  # a replica with the noise
CLEAN = INCLUDED.astype(float)  # a replica trained without noise: scores reveal inclusion


def test_one_process_gathers_its_own_scores_and_keeps_its_seed():
    assert [s.tolist() for s in gather_scores(np.array([1.0, 2.0]))] == [[1.0, 2.0]]
    assert shared_seed(5) == 5
    assert shared_seed(None) != shared_seed(None)  # fresh OS entropy when no seed is given


def test_replicas_agree_up_to_rounding_only():
    assert replicas_agree([NOISY, NOISY.copy(), NOISY * (1 + 1e-9)])
    assert not replicas_agree([NOISY, CLEAN])
    assert not replicas_agree([NOISY, NOISY + 1e-3])


def test_one_replica_is_the_plain_audit():
    plain = audit_scores(scores=NOISY, included=INCLUDED, delta=1e-5)
    assert _audit_replicas([NOISY], included=INCLUDED, delta=1e-5, confidence=0.95) == plain


def test_diverged_replicas_take_the_largest_bound_with_bonferroni_over_ranks():
    """A noise-free replica beside a noisy one: its bound counts, at confidence 1 - 0.05/2."""
    alone = audit_scores(scores=CLEAN, included=INCLUDED, delta=1e-5)
    halved = audit_scores(scores=CLEAN, included=INCLUDED, delta=1e-5, confidence=1 - 0.05 / 2)
    both = _audit_replicas([NOISY, CLEAN], included=INCLUDED, delta=1e-5, confidence=0.95)
    assert both.epsilon_lower == pytest.approx(halved.epsilon_lower) and both.epsilon_lower < alone.epsilon_lower
    assert both.confidence == 0.95 and both.epsilon_lower > 2  # the stated confidence, the clean replica's bound
    # the order of the ranks does not matter
    assert _audit_replicas([CLEAN, NOISY], included=INCLUDED, delta=1e-5, confidence=0.95) == both


def test_report_says_when_replicas_diverged():
    kw = dict(kind="gradient", certified_epsilon=1.0, delta=1e-5, epsilon_lower=3.0, confidence=0.95,
              num_canaries=400, num_included=200, num_guesses=10, num_correct=10, steps=10, noise_multiplier=2.0,
              sample_rate=0.1, train_seconds=1.0, rules_tried=12, num_processes=2)
    diverged = AuditReport(**kw, replicas_agree=False).summary_lines()
    assert diverged[0].startswith("PRIVACY VIOLATION") and diverged[1].startswith("REPLICAS DIVERGED: the 2 processes")
    assert any(line.startswith("run:") and line.endswith("2 processes") for line in diverged)
    agreed = AuditReport(**kw).summary_lines()
    assert not any(line.startswith("REPLICAS DIVERGED") for line in agreed)
    assert AuditReport(**kw, replicas_agree=False).to_dict()["replicas_agree"] is False
