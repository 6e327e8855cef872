"""Accountants: certified PLD/RDP adapters, the Edgeworth accountant, reports, state, validation."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as DpPLD
from dp_accounting.rdp import RdpAccountant as DpRDP

from hf_ewtune.accounting import (
    Accountant,
    EdgeworthAccountant,
    PLDAccountant,
    PrivacyReport,
    RDPAccountant,
    accountant_from_state,
    make_accountant,
)
from hf_ewtune.accounting import certified as certified_module
from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError

# Design note section 9 at delta = 1e-5: (q, sigma, m, PLD, RDP)
REFERENCE = [
    (0.001, 0.6, 100, 0.77959, 2.2334),
    (0.001, 1.0, 1000, 0.14896, 0.67783),
    (0.001, 1.5, 10000, 0.25262, 0.33170),
    (0.01, 0.6, 100, 3.8156, 4.8313),
    (0.01, 0.8, 1000, 3.1410, 3.6956),
    (0.01, 1.0, 100, 0.71804, 1.2142),
    (0.01, 1.0, 1000, 1.8282, 2.1014),
    (0.01, 1.0, 10000, 6.1877, 6.7128),
    (0.01, 1.5, 10000, 3.1856, 3.4594),
    (0.05, 0.6, 100, 11.506, 13.305),
    (0.05, 1.0, 1000, 10.987, 12.017),
    (0.05, 1.5, 10000, 22.306, 23.833),
]
PLD_ROWS = [REFERENCE[i] for i in (1, 7, 10)]  # PLD at 1e-4 costs ~0.6 s per query: a spread subset
SST2 = dict(noise_multiplier=0.7865, sample_rate=0.029696, num_steps=660)


def _direct(acc, events, delta):
    for e in events:
        acc.compose(e)
    return acc.get_epsilon(delta)


def _event(sigma, q, n):
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)


@pytest.fixture(scope="module")
def sst2_edgeworth():
    acc = EdgeworthAccountant()
    acc.step(**SST2)
    return acc


@pytest.mark.parametrize("q,sigma,m,pld,rdp", PLD_ROWS)
def test_pld_matches_reference_and_dp_accounting(q, sigma, m, pld, rdp):
    acc = PLDAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=m)
    eps = acc.get_epsilon(1e-5)
    assert eps == pytest.approx(pld, rel=1e-3, abs=1e-3)


def test_pld_is_exactly_dp_accounting():
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.step(noise_multiplier=0.8, sample_rate=0.01, num_steps=1000)
    direct = _direct(DpPLD(value_discretization_interval=1e-3), [_event(0.8, 0.01, 1000)], 1e-5)
    assert acc.get_epsilon(1e-5) == direct
    assert "value discretization 1e-3" in acc.certified_by


@pytest.mark.parametrize("q,sigma,m,pld,rdp", REFERENCE)
def test_rdp_matches_reference_and_dp_accounting(q, sigma, m, pld, rdp):
    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=m)
    eps = acc.get_epsilon(1e-5)
    assert eps == pytest.approx(rdp, rel=1e-3)
    assert eps == _direct(DpRDP(), [_event(sigma, q, m)], 1e-5)
    assert eps >= pld * (1 - 1e-3)  # RDP is looser than PLD


def test_sst2_anchor(sst2_edgeworth):
    report = sst2_edgeworth.get_privacy_spent(delta=1e-5)
    assert report.edgeworth_epsilon == pytest.approx(7.9929, abs=1e-3)
    assert report.epsilon == pytest.approx(8.2891, abs=2e-3)
    assert report.epsilon > report.edgeworth_epsilon  # the estimate under-states epsilon here
    assert report.accountant == "edgeworth" and report.steps == 660
    assert report.noise_multiplier == 0.7865 and report.sample_rate == 0.029696
    assert "PLD" in report.certified_by and "pessimistic" in report.certified_by and "value discretization 1e-4" in report.certified_by
    assert report.edgeworth_error_bound["certified"] is False


@pytest.mark.parametrize("setting", [SST2, dict(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)])
def test_certified_epsilon_within_one_percent_above_pld(setting, sst2_edgeworth):
    if setting is SST2:
        acc = sst2_edgeworth
    else:
        acc = EdgeworthAccountant()
        acc.step(**setting)
    pld = PLDAccountant()
    pld.step(**setting)
    cert, ref = acc.get_epsilon(1e-5), pld.get_epsilon(1e-5)
    assert ref <= cert <= 1.01 * ref


def test_repeated_queries_use_the_cache(monkeypatch):
    calls = []
    real = certified_module.pld_epsilon

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(certified_module, "pld_epsilon", counting)
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=50)
    first = acc.get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) == first and len(calls) == 1
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert acc.get_epsilon(1e-5) > first and len(calls) == 2


def test_steps_merge_and_history():
    acc = make_accountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=4)
    acc.step(noise_multiplier=0.9, sample_rate=0.01, num_steps=2)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=0)  # no-op
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=3)
    assert acc.history == [(1.0, 0.01, 5), (0.9, 0.01, 2), (1.0, 0.01, 3)]
    assert acc.steps == 10


@pytest.mark.parametrize("name", ["edgeworth", "pld", "rdp"])
def test_zero_steps_and_zero_noise(name):
    acc = make_accountant(name)
    assert acc.get_epsilon(1e-5) == 0.0
    assert acc.get_privacy_spent(1e-5).epsilon == 0.0
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert math.isinf(acc.get_epsilon(1e-5))
    report = acc.get_privacy_spent(1e-5)
    assert math.isinf(report.epsilon) and report.to_dict()["epsilon"] == "inf"


def test_heterogeneous_composition_matches_dp_accounting():
    segments = [(1.0, 0.01, 100), (0.8, 0.02, 50), (1.0, 0.01, 30)]
    events = [_event(*s) for s in segments]
    rdp = RDPAccountant()
    pld = PLDAccountant(value_discretization_interval=1e-3)
    ew = EdgeworthAccountant(value_discretization_interval=1e-3)
    for sigma, q, n in segments:
        for acc in (rdp, pld, ew):
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    assert rdp.get_epsilon(1e-5) == pytest.approx(_direct(DpRDP(), events, 1e-5), rel=1e-12)
    direct = _direct(DpPLD(value_discretization_interval=1e-3), events, 1e-5)
    assert pld.get_epsilon(1e-5) == pytest.approx(direct, rel=1e-9)
    assert ew.get_epsilon(1e-5) == pytest.approx(direct, rel=1e-9)
    single = PLDAccountant(value_discretization_interval=1e-3)
    single.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=130)
    assert pld.get_epsilon(1e-5) > single.get_epsilon(1e-5)
    report = ew.get_privacy_spent(1e-5)
    assert report.edgeworth_error_bound["certified"] is False
    assert "not available" in report.edgeworth_error_bound["reason"]
    assert report.edgeworth_epsilon > 0 and report.noise_multiplier == 1.0


@pytest.mark.parametrize(
    "acc",
    [EdgeworthAccountant(order=2, certifier="rdp"), PLDAccountant(value_discretization_interval=1e-3), RDPAccountant()],
    ids=["edgeworth", "pld", "rdp"],
)
def test_state_dict_round_trip(acc):
    acc = acc.copy()
    acc.step(noise_multiplier=1.1, sample_rate=0.02, num_steps=20)
    acc.step(noise_multiplier=0.9, sample_rate=0.02, num_steps=5)
    state = json.loads(json.dumps(acc.state_dict()))
    assert state["accountant"] == acc.name
    restored = accountant_from_state(state)
    assert type(restored) is type(acc)
    assert restored.options() == acc.options() and restored.history == acc.history
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    other = make_accountant(acc.name, **acc.options())
    other.load_state_dict(state)
    assert other.steps == 25


def test_state_dict_errors():
    with pytest.raises(PrivacyStateError, match="rdp"):
        PLDAccountant().load_state_dict(RDPAccountant().state_dict())
    with pytest.raises(PrivacyStateError):
        accountant_from_state({"accountant": "nope", "history": []})
    with pytest.raises(PrivacyStateError):
        accountant_from_state({"history": []})
    with pytest.raises(PrivacyStateError):
        PLDAccountant().load_state_dict({"accountant": "pld", "history": [["x"]]})


def test_report_labels_and_json(sst2_edgeworth):
    report = sst2_edgeworth.get_privacy_spent(delta=1e-5)
    text = str(report)
    assert "Edgeworth estimate (not a guarantee)" in text
    assert text.splitlines()[0].startswith("Certified privacy: epsilon = 8.28")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["edgeworth_error_bound"]["epsilon_upper"] == "inf"
    back = PrivacyReport.from_dict(data)
    assert math.isinf(back.edgeworth_error_bound["epsilon_upper"])
    assert back.epsilon == report.epsilon and back.history == report.history


def test_edgeworth_estimate_method(sst2_edgeworth):
    assert sst2_edgeworth.estimate_epsilon(1e-5) == pytest.approx(7.9929, abs=1e-3)
    assert sst2_edgeworth.estimate_epsilon(1e-5, order=2) == pytest.approx(8.3702, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(noise_multiplier=1.0, sample_rate=0.0), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=1.5), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=float("nan")), "sample_rate"),
        (dict(noise_multiplier=-0.1, sample_rate=0.1), "noise_multiplier"),
        (dict(noise_multiplier=float("inf"), sample_rate=0.1), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=-1), "num_steps"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=1.5), "num_steps"),
    ],
)
def test_step_validation(kwargs, arg):
    with pytest.raises(PrivacyConfigError, match=arg):
        EdgeworthAccountant().step(**kwargs)


def test_step_is_keyword_only_and_other_errors():
    acc = PLDAccountant()
    with pytest.raises(TypeError):
        acc.step(1.0, 0.01)  # type: ignore[misc]
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(PrivacyConfigError, match="delta"):
            acc.get_epsilon(bad)
    with pytest.raises(PrivacyConfigError, match="accountant"):
        make_accountant("moments")
    with pytest.raises(PrivacyConfigError, match="order"):
        EdgeworthAccountant(order=3)
    with pytest.raises(PrivacyConfigError, match="certifier"):
        EdgeworthAccountant(certifier="prv")
    assert isinstance(make_accountant("EW"), EdgeworthAccountant)
    assert isinstance(make_accountant("pld"), Accountant)


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-7])
@pytest.mark.parametrize("sigma,q,m", [(0.6, 0.001, 100), (0.8, 0.01, 1000), (1.5, 0.05, 3000)])
def test_certified_epsilon_equals_dp_accounting_pld_on_a_grid(sigma, q, m, delta):
    # value discretization 1e-3 keeps this grid fast; the adapter must return dp-accounting's number exactly
    acc = EdgeworthAccountant(value_discretization_interval=1e-3)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=m)
    direct = _direct(DpPLD(value_discretization_interval=1e-3), [_event(sigma, q, m)], delta)
    assert acc.get_epsilon(delta) == direct
    assert acc.estimate_epsilon(delta) > 0  # the estimate is reported beside it, never instead of it


def test_calibration_reports_its_own_wall_time():
    """Regression: ``seconds`` was measured from the search's starting sigma (a name clash), not the clock."""
    import time

    from hf_ewtune.accounting.calibration import calibrate

    t0 = time.perf_counter()
    result = calibrate(target_epsilon=3, delta=1e-5, sample_rate=0.01, steps=300)
    elapsed = time.perf_counter() - t0
    assert 0.0 < result.seconds <= elapsed
