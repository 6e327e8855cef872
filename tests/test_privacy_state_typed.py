"""PrivacyState: the typed, versioned content of _privacy_state.json (issue 12, item 2)."""

from __future__ import annotations

import json

import pytest

from hf_ewtune.accounting import PLDAccountant, make_accountant
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.json_safe import json_safe
from hf_ewtune.privacy_state import PRIVACY_STATE_NAME, PrivacyState, load_privacy_state, save_privacy_state


def _state(steps=5, sigma=1.0, q=0.1, **extra):
    acc = make_accountant("pld")
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return {"accountant": "pld", "accountant_state": acc.state_dict(), "steps": steps, "delta": 1e-5,
            "noise_multiplier": sigma, "sample_rate": q, "global_step": steps, **extra}


def test_round_trip_keeps_known_and_unknown_fields(tmp_path):
    state = PrivacyState.from_dict(_state(custom_field={"a": 1}, epsilon="inf", expected_batch_size=8.0))
    assert state.steps == 5 and state.sessions == [[1.0, 0.1]] and state.extra == {"custom_field": {"a": 1}}
    assert state.epsilon == float("inf") and state.expected_batch_size == 8
    data = state.to_dict()
    assert data["epsilon"] == "inf" and data["custom_field"] == {"a": 1} and data["format_version"] == 1
    assert PrivacyState.from_dict(data) == state
    save_privacy_state(str(tmp_path), state)
    assert load_privacy_state(str(tmp_path)) == data
    assert PrivacyState.load(tmp_path) == state


def test_nested_accountant_layout_is_normalised():
    flat = _state()
    nested = {**flat, "accountant": {"name": "pld", "state": flat.pop("accountant_state")}}
    assert PrivacyState.from_dict(nested).to_dict()["accountant_state"]["history"] == [[1.0, 0.1, 5]]


@pytest.mark.parametrize("edit, match", [
    ({"format_version": 2}, "format_version 2 is not supported"),
    ({"format_version": True}, "format_version True"),
    ({"accountant": "rdp"}, "names accountant 'rdp'"),
    ({"stopped_early": "no"}, "'stopped_early' must be true or false"),
    ({"global_step": 6}, "global_step 6"),
    ({"sessions": [[2.0, 0.1]], "noise_multiplier": 2.0}, "never used"),
    ({"sessions": [[1.0, 0.1]], "noise_multiplier": 2.0}, "sessions end with"),
    ({"budget_steps": 2.5}, "'budget_steps' must be a non-negative integer"),
    ({"calibration": {"noise_multiplier": 0.8, "sample_rate": 0.1}}, "calibration record says 0.8"),
])
def test_invalid_fields_are_refused(edit, match):
    with pytest.raises(PrivacyStateError, match=match):
        PrivacyState.from_dict({**_state(), **edit})


def test_a_resumed_session_with_other_settings_is_accepted():
    acc = make_accountant("pld")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=2)
    acc.step(noise_multiplier=1.5, sample_rate=0.1, num_steps=3)
    state = PrivacyState.from_dict({"accountant": "pld", "accountant_state": acc.state_dict(), "steps": 5,
                                    "delta": 1e-5, "noise_multiplier": 1.5, "sample_rate": 0.1,
                                    "sessions": [[1.0, 0.1], [1.5, 0.1]]})
    assert state.sessions == [[1.0, 0.1], [1.5, 0.1]]


@pytest.mark.parametrize("count", [True, 2.5, 2.0, 0, -1, "2"])
def test_accountant_load_state_dict_refuses_non_integer_counts(count):
    acc = PLDAccountant()
    with pytest.raises(PrivacyStateError, match="step count"):
        acc.load_state_dict({"accountant": "pld", "history": [[1.0, 0.1, count]]})
    assert acc.steps == 0


def test_folder_trainer_state_must_agree(tmp_path):
    save_privacy_state(str(tmp_path), _state())
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert PrivacyState.load(tmp_path).global_step == 5
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    with pytest.raises(PrivacyStateError, match="global_step 7"):
        PrivacyState.load(tmp_path)
    assert (tmp_path / PRIVACY_STATE_NAME).is_file()


def test_one_json_safe_conversion_is_used_everywhere():
    from hf_ewtune import model_card
    from hf_ewtune.accounting import report

    assert report._json_safe is json_safe and model_card._finite_or_str is json_safe
    assert json_safe({1: (float("-inf"), float("nan"))}) == {"1": ["-inf", "nan"]}
