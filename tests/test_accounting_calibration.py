"""Noise calibration (R5) and step budgets."""

from __future__ import annotations

import warnings

import pytest

from hf_ewtune.accounting import (
    CalibrationResult,
    RDPAccountant,
    calibrate,
    calibrate_noise_multiplier,
    make_accountant,
    steps_within_budget,
)
from hf_ewtune.accounting.certified import pld_epsilon, rdp_epsilon
from hf_ewtune.errors import BudgetExhaustedError, PrivacyConfigError

GENERIC = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=300)


@pytest.fixture(scope="module")
def generic_result():
    return calibrate(**GENERIC)


def test_calibration_is_certified_and_tight(generic_result):
    r = generic_result
    assert isinstance(r, CalibrationResult) and r.certified and r.accountant == "edgeworth"
    sigma = r.noise_multiplier
    # independent certified check, and minimality within 0.5%
    certified = pld_epsilon([(sigma, 0.01, 300)], 1e-5)
    assert certified <= 3.0 and r.epsilon == pytest.approx(certified)
    assert pld_epsilon([(sigma * (1 - 0.005), 0.01, 300)], 1e-5) > 3.0
    assert sigma == pytest.approx(0.7061, rel=5e-3)  # design note section 9 (PLD)
    assert r.sigma_edgeworth == pytest.approx(0.6236, abs=1e-3)  # EW1 under-noises by about 12%
    assert "PLD" in r.certified_by and r.seconds > 0
    assert r.to_dict()["noise_multiplier"] == sigma


def test_calibration_without_certification_reproduces_ew_tune():
    with pytest.warns(UserWarning, match="not a privacy guarantee"):
        r = calibrate(target_epsilon=8.0, delta=1e-5, sample_rate=0.029696, steps=660, certify=False)
    assert r.noise_multiplier == pytest.approx(0.7862, abs=1e-3)  # EW-Tune's SST-2 sigma (0.7865 on its grid)
    assert r.noise_multiplier == r.sigma_edgeworth
    assert r.epsilon == pytest.approx(8.2968, abs=0.01)  # certified epsilon at EW-Tune's sigma
    assert r.certified is False and r.edgeworth_epsilon == pytest.approx(8.0, abs=1e-2)


def test_rdp_calibration_and_float_helper():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # certified calibration never warns
        sigma = calibrate_noise_multiplier(**GENERIC, accountant="rdp")
    assert rdp_epsilon([(sigma, 0.01, 300)], 1e-5) <= 3.0 < rdp_epsilon([(sigma * 0.995, 0.01, 300)], 1e-5)
    assert sigma == pytest.approx(0.7640, rel=5e-3)
    assert calibrate(**GENERIC, accountant=RDPAccountant()).noise_multiplier == sigma


@pytest.mark.parametrize(
    "override,arg",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=float("inf")), "target_epsilon"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=2.0), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(steps=-5), "steps"),
    ],
)
def test_calibration_validation(override, arg):
    with pytest.raises(PrivacyConfigError, match=arg):
        calibrate(**{**GENERIC, **override})


def test_calibration_unknown_accountant():
    with pytest.raises(PrivacyConfigError, match="accountant"):
        calibrate(**GENERIC, accountant="moments")


def test_steps_within_budget_rdp_is_exact():
    n = steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=2.0, delta=1e-5, accountant="rdp")
    assert rdp_epsilon([(1.0, 0.01, n)], 1e-5) <= 2.0 < rdp_epsilon([(1.0, 0.01, n + 1)], 1e-5)


def test_steps_within_budget_pld_is_exact():
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=1.0, delta=1e-5)
    n = steps_within_budget(**kw, accountant="edgeworth")
    assert n > 0
    assert pld_epsilon([(1.0, 0.01, n)], 1e-5) <= 1.0 < pld_epsilon([(1.0, 0.01, n + 1)], 1e-5)


def test_steps_within_budget_with_steps_already_taken():
    already = make_accountant("rdp")
    already.step(noise_multiplier=0.8, sample_rate=0.02, num_steps=30)
    before = already.history
    n = steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=3.0, delta=1e-5, already=already)
    assert already.history == before  # not modified
    history = before + [(1.0, 0.01, n)]
    assert rdp_epsilon(history, 1e-5) <= 3.0 < rdp_epsilon(before + [(1.0, 0.01, n + 1)], 1e-5)
    capped = steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=3.0, delta=1e-5,
                                 already=already, max_steps=7)
    assert capped == 7
    assert steps_within_budget(noise_multiplier=0.0, sample_rate=0.01, target_epsilon=3.0, delta=1e-5,
                               already=already) == 0
    with pytest.raises(BudgetExhaustedError, match="target_epsilon"):
        steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=0.5, delta=1e-5, already=already)


def test_steps_within_budget_validation():
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        steps_within_budget(noise_multiplier=-1.0, sample_rate=0.01, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(PrivacyConfigError, match="max_steps"):
        steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=1.0, delta=1e-5,
                            accountant="rdp", max_steps=-1)
