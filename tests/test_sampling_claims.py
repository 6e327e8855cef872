"""Every sampling mode, at example and at user level, is described as what it is by the plan line, the card's
metadata and readable section, and ``hf-ewtune report``; the user-level delta texts count users (U), not rows."""

from __future__ import annotations

import pytest

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.large_delta import USER_LARGE_DELTA_NOTE
from hf_ewtune.model_card import MECHANISM, build_privacy_metadata, format_privacy_report, render_privacy_section
from hf_ewtune.run_plan import SAMPLING_WORDS, privacy_plan_line
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


def _trainer(tmp_path, *, users: bool, **kw):
    ds = _data(40)
    if users:
        ds = ds.add_column("author", [f"user{i % 10}" for i in range(40)])
        kw["user_id_column"] = "author"
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=2),
                     train_dataset=ds, noise_multiplier=1.0, noise_seed=0, **kw)


@pytest.mark.parametrize("users, sampling", [
    (False, "poisson"), (False, "shuffled"), (False, "random_allocation"), (True, "poisson"), (True, "shuffled"),
])
def test_the_sampling_is_named_as_what_it_is_everywhere(tmp_path, users, sampling):
    trainer = _trainer(tmp_path, users=users, sampling=sampling)
    line = privacy_plan_line(trainer)
    named = SAMPLING_WORDS[sampling] + (" of users" if users else "")
    assert f"{named}, sample rate q" in line
    trainer.train()
    state = trainer.privacy_state()
    meta = build_privacy_metadata(state)
    text = render_privacy_section(state, metadata=meta)
    report = format_privacy_report(state)
    row = {"poisson": "Poisson sampling", "shuffled": "shuffled fixed-size batches",
           "random_allocation": "random allocation (balls-in-bins)"}[sampling] + (" of users" if users else "")
    assert f"| sampling | {row}, rate q" in text
    assert f"sampling: {row.replace('Poisson sampling', 'Poisson')} (rate" in report
    if sampling != "poisson":
        assert "Poisson" not in meta["mechanism"] + meta["sampling"]
        assert "Poisson sampling" not in line and "Poisson-sampled" not in text
    if users:
        assert meta["sampling_over"].startswith("users") and "of users" not in meta["sampling"]
        assert "each example's" not in text and "every example was" not in text
        if sampling == "shuffled":
            assert "each user's participations" in text and "one user of this run" in meta["certified_by"]
        assert "below 1/U, U = the number of users" in line and "1/N" not in line
        assert "(per-user gradient clipping" in text and "per-example gradient clipping" not in text
    else:
        assert "sampling_over" not in meta and "below 1/N, N = the number of training rows" in line
        assert "(per-example gradient clipping" in text


def test_an_old_shuffled_state_accounted_as_poisson_does_not_claim_a_poisson_mechanism():
    from hf_ewtune.accounting import PLDAccountant

    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    meta = build_privacy_metadata({"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5,
                                   "poisson_sampling": False, "steps": 10})
    assert meta["mechanism"] != MECHANISM and "shuffled fixed-size batches" in meta["mechanism"]
    assert meta["epsilon_is"].startswith("NOT certified")


def test_a_user_level_delta_at_or_above_one_over_u_is_refused_in_users(tmp_path):
    # U = 10 users, N = 40 rows: 0.2 is below 1/N = 0.025? no; it is at or above 1/U = 0.1, which is what matters
    with pytest.raises(PrivacyConfigError, match=r"not below 1/U = 0\.1 \(U = 10 users\).*all the rows of whole users"):
        _trainer(tmp_path, users=True, target_delta=0.2)


def test_a_user_level_large_delta_card_counts_users(tmp_path):
    trainer = _trainer(tmp_path, users=True, target_delta=0.2, allow_large_delta=True)
    trainer.train()
    state = trainer.privacy_state()
    meta = build_privacy_metadata(state)
    assert meta["delta_note"] == USER_LARGE_DELTA_NOTE
    text = render_privacy_section(state, metadata=meta)
    assert "below 1/U, U being the number of users" in text and "1/N" not in text


@pytest.mark.parametrize("unit", ["user", " User "])
def test_a_user_unit_without_user_id_column_is_refused(tmp_path, unit):
    # rows would be clipped one by one while the card said "each user's rows were clipped together"
    with pytest.raises(PrivacyConfigError, match="privacy_unit=.*would state user-level privacy.*user_id_column"):
        _trainer(tmp_path, users=False, privacy_unit=unit)


def test_a_state_claiming_users_without_their_column_gets_no_card():
    from hf_ewtune.accounting import PLDAccountant
    from hf_ewtune.errors import PrivacyStateError

    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    with pytest.raises(PrivacyStateError, match="records no user_id_column"):
        build_privacy_metadata({"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5,
                                "poisson_sampling": True, "steps": 10, "privacy_unit": "user"})
