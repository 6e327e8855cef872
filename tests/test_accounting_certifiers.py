"""EdgeworthAccountant(certifiers=...): the published epsilon is the smallest certified value computed, labelled."""

from __future__ import annotations

import json

import pytest

import hf_ewtune.accounting.edgeworth_accountant as ew_mod
from hf_ewtune.accounting import EdgeworthAccountant, accountant_from_state, make_accountant
from hf_ewtune.accounting.certified import pld_description
from hf_ewtune.errors import PrivacyConfigError

# sigma 2, q 1e-4, 50,000 steps: PLD at discretization 1e-4 gives 0.0432, the saddle-point bound 0.0380
# (PLD at 1e-5 gives 0.0332, below both: each is a valid upper bound, the bound is the tighter one here)
LONG_RUN = (2.0, 1e-4, 50_000)


def _acc(history, **options):
    acc = make_accountant("edgeworth", **options)
    acc.step(noise_multiplier=history[0], sample_rate=history[1], num_steps=history[2])
    return acc


def test_saddle_point_certifier_is_published_where_it_is_smaller_and_labelled():
    acc = _acc(LONG_RUN, certifiers=("pld", "saddle_point"))
    plain = _acc(LONG_RUN)
    report = acc.get_privacy_spent(1e-5)
    assert report.epsilon < plain.get_epsilon(1e-5)  # PLD alone publishes the larger certified value
    assert report.epsilon == pytest.approx(0.0380, abs=5e-4)
    assert report.certified_by.startswith("saddle-point accountant upper bound")
    assert "Alghamdi et al. 2023" in report.certified_by
    assert plain.get_privacy_spent(1e-5).certified_by == pld_description()
    restored = accountant_from_state(json.loads(json.dumps(acc.state_dict())))
    assert restored.certifiers == ("pld", "saddle_point") and restored.get_epsilon(1e-5) == report.epsilon


def test_pld_stays_published_and_labelled_where_it_is_smaller():
    acc = _acc((0.7865, 0.029696, 660), certifiers=("pld", "saddle_point"))
    report = acc.get_privacy_spent(1e-5)
    assert round(report.epsilon, 2) == 8.29
    assert report.certified_by == pld_description()


def test_default_accountant_computes_no_saddle_point_bound(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the default path must not compute the saddle-point bound")

    monkeypatch.setattr(ew_mod, "spa_bound", boom)
    acc = _acc((1.0, 0.01, 100))
    assert acc.certifiers == ("pld",)
    assert acc.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("bad", [("saddle_point",), ("pld", "rdp"), ("pld", "moments"), "pld", ("pld", "pld")])
def test_bad_certifiers_are_refused_with_the_fix(bad):
    with pytest.raises(PrivacyConfigError, match="certifiers"):
        EdgeworthAccountant(certifiers=bad)


def test_certifiers_replace_certifier():
    acc = EdgeworthAccountant(certifiers=("rdp", "saddle_point"))
    assert acc.certifier == "rdp" and acc.certifier_label == "RDP"
