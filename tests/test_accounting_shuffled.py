"""Shuffled fixed-size batches (``poisson_sampling=False``) get a certified bound, and only it is called certified."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import norm

from hf_ewtune import DPTrainer, cli
from hf_ewtune.accounting import (
    PLDAccountant,
    ShuffledAccountant,
    accountant_from_state,
    calibrate,
    gaussian_epsilon,
    steps_within_budget,
)
from hf_ewtune.accounting.shuffled import shuffled_participation
from hf_ewtune.model_card import (
    CERTIFIED,
    add_privacy_to_model_card,
    build_privacy_metadata,
    format_privacy_report,
    read_privacy_metadata,
)
from hf_ewtune.sampling import PoissonBatchSampler, steps_per_epoch_for
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data

DELTA = 1e-6


def _closed_form_delta(mu: float, eps: float) -> float:
    # Balle & Wang (2018), Theorem 8, written out independently of hf_ewtune.
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize(
    "sigma, spe, per_epoch, per_step, steps",
    [(1.0, 45, 1, 1, 90), (0.8405, 45, 2, 2, 90), (3.0, 10, 1, 1, 25), (2.0, 4, 2, 2, 7)],
)
def test_shuffled_bound_equals_the_gaussian_closed_form(sigma, spe, per_epoch, per_step, steps):
    acc = ShuffledAccountant(steps_per_epoch=spe, participations_per_epoch=per_epoch, max_per_step=per_step)
    acc.step(noise_multiplier=sigma, sample_rate=0.02, num_steps=steps)
    epochs = math.ceil(steps / spe)
    mu = 2.0 * math.sqrt(per_step * per_epoch * epochs) / sigma  # sensitivity 2C per occurrence, noise sigma C
    eps = acc.get_epsilon(DELTA)
    assert eps == pytest.approx(gaussian_epsilon(mu, DELTA), rel=1e-12)
    assert _closed_form_delta(mu, eps) <= DELTA  # on the safe side of the root ...
    assert _closed_form_delta(mu, eps * (1 - 1e-6)) > DELTA  # ... and tight


def test_shuffled_bound_matches_dp_accounting_gaussian_pld():
    import dp_accounting
    from dp_accounting.pld import PLDAccountant as DpPLD

    acc = ShuffledAccountant(steps_per_epoch=10)
    acc.step(noise_multiplier=1.5, sample_rate=0.1, num_steps=30)  # 3 epochs, one occurrence each
    ref = DpPLD(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4)
    ref.compose(dp_accounting.GaussianDpEvent(1.5), 3)  # dp-accounting's replace-one Gaussian: sensitivity 2C
    pessimistic = ref.get_epsilon(DELTA)
    assert acc.get_epsilon(DELTA) <= pessimistic <= acc.get_epsilon(DELTA) * 1.001


@pytest.mark.parametrize("sigma, q, steps", [(0.8405, 256 / 11476, 90), (1.0, 0.01, 300), (2.0, 0.25, 8), (1.0, 1.0, 3)])
def test_shuffled_epsilon_is_never_below_poisson_pld(sigma, q, steps):
    n = 11476 if q < 0.03 else 400
    spe = steps_per_epoch_for(q)
    shuffled = ShuffledAccountant.for_sampler(num_examples=n, batch_size=max(1, round(q * n)), steps_per_epoch=spe)
    shuffled.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    poisson = PLDAccountant()
    poisson.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert shuffled.get_epsilon(DELTA) >= poisson.get_epsilon(DELTA)


@pytest.mark.parametrize("n, q", [(100, 0.1), (97, 0.1), (10, 0.6), (50, 0.3), (37, 1.0)])
def test_participation_bounds_hold_for_the_real_sampler(n, q):
    sampler = PoissonBatchSampler(n, q, num_micro_batches=1, seed=3, poisson=False)
    per_epoch, per_step = shuffled_participation(num_examples=n, batch_size=sampler.fixed_batch_size,
                                                 steps_per_epoch=sampler.steps_per_epoch)
    seen_epoch, seen_step = 0, 0
    for epoch in range(30):
        counts: dict[int, int] = {}
        for batch in sampler.logical_batches(epoch):
            ids = batch.tolist()
            seen_step = max(seen_step, max(ids.count(i) for i in set(ids)))
            for i in ids:
                counts[i] = counts.get(i, 0) + 1
        seen_epoch = max(seen_epoch, max(counts.values()))
    assert seen_epoch <= per_epoch and seen_step <= per_step
    assert seen_epoch == per_epoch  # the bound is attained (30 epochs are plenty for these sizes)


def test_calibration_under_shuffling_meets_the_target():
    template = ShuffledAccountant.for_sampler(num_examples=11476, batch_size=256, steps_per_epoch=45)
    result = calibrate(target_epsilon=8.0, delta=DELTA, sample_rate=256 / 11476, steps=90, accountant=template)
    assert result.accountant == "shuffled" and result.certified and "shuffled-batch bound" in result.certified_by
    assert result.epsilon <= 8.0
    smaller = template.copy()
    smaller.step(noise_multiplier=result.noise_multiplier / 1.005, sample_rate=256 / 11476, num_steps=90)
    assert smaller.get_epsilon(DELTA) > 8.0  # within 0.5% of the smallest noise that meets the target
    budget = steps_within_budget(noise_multiplier=result.noise_multiplier, sample_rate=256 / 11476,
                                 target_epsilon=8.0, delta=DELTA, accountant=template)
    assert budget >= 90


def test_a_restart_counts_its_partial_epoch_and_survives_a_state_round_trip():
    acc = ShuffledAccountant(steps_per_epoch=10)
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=5)
    acc.start_run()  # resume mid-epoch: fresh permutations, so an example may occur again in epoch 0
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)
    assert acc.history == [(1.0, 0.1, 5), (1.0, 0.1, 10)] and acc.epochs_touched() == [1, 2]
    restored = accountant_from_state(acc.state_dict())
    assert restored.history == acc.history and restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    assert acc.get_epsilon(DELTA) == pytest.approx(gaussian_epsilon(2.0 * math.sqrt(3), DELTA))


def test_shuffled_run_card_is_certified_by_the_shuffling_bound_only(tmp_path):
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                        target_epsilon=8.0, target_delta=1e-5, poisson_sampling=False, noise_seed=0)
    assert trainer.privacy_callback.accountant.name == "shuffled"
    trainer.train()
    state = trainer.privacy_state()
    assert 0 < state["epsilon"] <= 8.0 and "shuffled-batch bound" in state["epsilon_certified_by"]
    add_privacy_to_model_card(str(tmp_path), state)
    meta = read_privacy_metadata(str(tmp_path))
    assert meta["epsilon_is"] == CERTIFIED and "shuffled-batch bound" in meta["certified_by"]
    assert meta["sampling"] == "shuffled fixed-size batches" and meta["adjacency"] == "replace-one example"
    text = (tmp_path / "README.md").read_text()
    assert "not formally certified" not in text and "ASSUMES Poisson" not in text
    assert "replace-one-example adjacency: replacing" in text
    report = format_privacy_report(state)
    assert report.startswith("Certified guarantee") and "shuffled" in report


def test_legacy_shuffled_state_accounted_as_poisson_is_not_called_certified():
    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    state = {"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5, "noise_multiplier": 1.0,
             "sample_rate": 0.01, "poisson_sampling": False, "steps": 100}
    meta = build_privacy_metadata(state)
    assert meta["epsilon_is"] != CERTIFIED and "NOT certified" in meta["epsilon_is"]
    assert meta["certified_by"].startswith("nothing for the sampling used")
    assert format_privacy_report(state).startswith("NOT certified")


def test_cli_prints_epsilon_per_sampling_mode(capsys):
    setting = ["--noise-multiplier", "0.8405", "--sample-rate", "0.022305", "--steps", "90", "--delta", "1e-6"]
    assert cli.main(["epsilon", *setting, "--accountant", "rdp", "--json"]) == 0
    poisson = json.loads(capsys.readouterr().out)
    assert cli.main(["epsilon", *setting, "--sampling", "shuffled", "--dataset-size", "11477", "--json"]) == 0
    shuffled = json.loads(capsys.readouterr().out)
    assert shuffled["accountant"] == "shuffled" and shuffled["adjacency"] == "replace-one example"
    assert "shuffled-batch bound" in shuffled["certified_by"] and shuffled["epsilon"] > poisson["epsilon"]
    # 45 steps x 256 > 11477: each epoch cuts ONE permutation (the last batch shorter), so P = M = 1 and
    # mu = 2 sqrt(2 epochs) / sigma (before the fix an epoch wrapped into a second permutation: P = M = 2, sqrt(8))
    assert shuffled["epsilon"] == pytest.approx(gaussian_epsilon(2 * math.sqrt(2) / 0.8405, 1e-6))
    assert cli.main(["epsilon", *setting, "--sampling", "shuffled"]) == 2
    assert "--dataset-size" in capsys.readouterr().err
