"""The audit catches broken DP mechanisms: with the real DPTrainer its lower bound stays below the certified
epsilon; with noise off, a tenth of the noise, no clipping, or a sampler drawing 4x the accounted rate
(broken in these tests only, see audit_helpers.py) it exceeds the claimed epsilon = 1.

Every run: 1-layer BERT, 100 ordinary rows + about 500 of 1000 gradient canaries, 10 steps of expected
batch 100, seeded (canary coins and noise), so the outcomes are deterministic."""

import os

import pytest
import torch

from audit_helpers import (
    CLAIMED_EPSILON,
    LowNoiseTrainer,
    NoClippingTrainer,
    NoNoiseTrainer,
    TOK,
    oversampling,
    tiny_audit,
)
from hf_ewtune.audit import PrivacyViolationWarning


def test_real_mechanism_stays_below_the_certified_epsilon(tmp_path):
    report = tiny_audit(tmp_path=tmp_path)
    assert report.certified_epsilon <= CLAIMED_EPSILON
    assert report.epsilon_lower < report.certified_epsilon and not report.violation
    assert report.steps == 10 and report.num_canaries == 1000
    assert not os.listdir(tmp_path)  # nothing trained with canaries is written


def test_noise_off_is_caught(tmp_path):
    with pytest.warns(PrivacyViolationWarning, match="EXCEEDS the certified epsilon"):
        report = tiny_audit(trainer_class=NoNoiseTrainer, tmp_path=tmp_path)
    assert report.violation and report.epsilon_lower > 3 * CLAIMED_EPSILON
    assert report.summary_lines()[0].startswith("PRIVACY VIOLATION")


def test_noise_scaled_down_is_caught(tmp_path):
    with pytest.warns(PrivacyViolationWarning):
        report = tiny_audit(trainer_class=LowNoiseTrainer, tmp_path=tmp_path)
    assert report.epsilon_lower > report.certified_epsilon


def test_clipping_off_is_caught(tmp_path):
    with pytest.warns(PrivacyViolationWarning):
        report = tiny_audit(trainer_class=NoClippingTrainer, tmp_path=tmp_path)
    assert report.epsilon_lower > report.certified_epsilon


def test_sampler_drawing_more_than_accounted_is_caught(tmp_path, monkeypatch):
    oversampling(monkeypatch)
    with pytest.warns(PrivacyViolationWarning):
        report = tiny_audit(tmp_path=tmp_path)
    assert report.epsilon_lower > report.certified_epsilon
