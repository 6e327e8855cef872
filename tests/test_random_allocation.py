"""Random allocation (balls-in-bins) sampling: the sampler, its certified accountant, and the card that names it."""

from __future__ import annotations

import itertools
import math

import pytest
from scipy.stats import norm

from hf_ewtune import DPTrainer, PrivacyArguments
from hf_ewtune.accounting import (
    PLDAccountant,
    RandomAllocationAccountant,
    ShuffledAccountant,
    accountant_from_state,
    gaussian_epsilon,
)
from hf_ewtune.accounting.random_allocation import (
    epochs_touched,
    jensen_add_epsilon,
    lattice_add_epsilon,
    log_sum_moments,
    random_allocation_epsilon,
    remove_epsilon,
    remove_rdp,
)
from hf_ewtune.accounting.random_allocation_mc import mc_epsilon_lower_bound
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.model_card import CERTIFIED, add_privacy_to_model_card, format_privacy_report, read_privacy_metadata
from hf_ewtune.sampling import PoissonBatchSampler
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("n, q, world, ga", [(100, 0.1, 1, 1), (97, 0.03, 2, 3), (10, 0.6, 2, 1), (37, 1.0, 1, 2)])
def test_sampler_puts_every_example_in_exactly_one_step_per_epoch_across_ranks(n, q, world, ga):
    samplers = [PoissonBatchSampler(n, q, num_micro_batches=ga * world, rank=r, world_size=world, seed=5,
                                    sampling="random_allocation") for r in range(world)]
    sizes = set()
    for epoch in range(4):
        for s in samplers:
            s.set_epoch(epoch)
        logical = list(samplers[0].logical_batches())
        assert len(logical) == samplers[0].steps_per_epoch
        sizes.update(len(b) for b in logical)
        per_rank = [list(s) for s in samplers]  # what each rank trains on: GA micro-batches per step
        assert all(len(batches) == len(s) for batches, s in zip(per_rank, samplers))
        seen = sorted(i for batches in per_rank for mb in batches for i in mb)
        assert seen == list(range(n))  # every example exactly once in the epoch, over all ranks
        for step, batch in enumerate(logical):  # and each step's micro-batches are that step's logical batch
            got = sorted(i for r in range(world) for mb in per_rank[r][step * ga:(step + 1) * ga] for i in mb)
            assert got == sorted(batch.tolist())
    if samplers[0].steps_per_epoch > 1:
        assert len(sizes) > 1  # batch sizes vary (Binomial), unlike shuffled batches


def test_sampler_epochs_are_fresh_draws_and_reproducible():
    a = PoissonBatchSampler(50, 0.1, num_micro_batches=1, seed=1, sampling="random_allocation")
    b = PoissonBatchSampler(50, 0.1, num_micro_batches=1, seed=1, sampling="random_allocation")
    e0 = [x.tolist() for x in a.logical_batches(0)]
    assert e0 == [x.tolist() for x in b.logical_batches(0)]
    assert e0 != [x.tolist() for x in a.logical_batches(1)]


@pytest.mark.parametrize("n, b, spe", [(11476, 256, 45), (100, 30, 3), (97, 10, 10)])
def test_shuffled_epoch_uses_one_permutation_so_no_example_repeats(n, b, spe):
    # The old sampler took round(N/b) blocks from a stream of permutations: with 45 x 256 > 11476 the epoch
    # wrapped into a second permutation, repeating 44 examples (and the accountant counted P = 2).
    sampler = PoissonBatchSampler(n, b / n, num_micro_batches=1, seed=0, poisson=False, steps_per_epoch=spe)
    for epoch in range(3):
        ids = [i for batch in sampler.logical_batches(epoch) for i in batch.tolist()]
        assert len(ids) == len(set(ids)) == min(n, spe * b)
    acc = ShuffledAccountant.for_sampler(num_examples=n, batch_size=b, steps_per_epoch=spe)
    assert (acc.participations_per_epoch, acc.max_per_step) == (1, 1)


def test_sampling_modes_are_checked_before_training():
    with pytest.raises(PrivacyConfigError, match="sampling must be one of"):
        PrivacyArguments(noise_multiplier=1.0, sampling="balls")
    with pytest.raises(PrivacyConfigError, match="contradicts poisson_sampling=False"):
        PrivacyArguments(noise_multiplier=1.0, sampling="random_allocation", poisson_sampling=False)
    with pytest.raises(PrivacyConfigError, match="user_id_column"):
        PrivacyArguments(noise_multiplier=1.0, sampling="random_allocation", user_id_column="user")
    with pytest.raises(PrivacyConfigError, match="sampling"):
        PoissonBatchSampler(10, 0.5, num_micro_batches=1, sampling="random_allocation", poisson=False)


# ---------------------------------------------------------------- accountant
def _brute_log_moment(sigma: float, t: int, a: int) -> float:
    total = 0.0
    for ks in itertools.product(range(a + 1), repeat=t):
        if sum(ks) == a:
            coef = math.factorial(a)
            for k in ks:
                coef //= math.factorial(k)
            total += coef * math.exp(sum(k * (k - 1) for k in ks) / (2 * sigma * sigma))
    return math.log(total)


@pytest.mark.parametrize("sigma, t, a", [(1.0, 3, 4), (0.7, 4, 5), (2.0, 5, 3), (0.5, 2, 6)])
def test_moments_of_the_sum_match_the_multinomial_expansion(sigma, t, a):
    assert log_sum_moments(sigma, t, a)[a] == pytest.approx(_brute_log_moment(sigma, t, a), rel=1e-12)


def test_one_step_per_epoch_is_the_gaussian_mechanism():
    assert remove_rdp(1.5, 1)[:3] == pytest.approx([a / (2 * 1.5**2) for a in (2, 3, 4)], rel=1e-8)
    history = ((1.5, 1.0, 4),)  # T = 1, 4 epochs: mu = 2 / 1.5, no shift
    assert jensen_add_epsilon(history, 1e-5) == gaussian_epsilon(2 / 1.5, 1e-5)  # Jensen is exact for T = 1
    assert lattice_add_epsilon(history, 1e-5) >= gaussian_epsilon(2 / 1.5, 1e-5)  # the lattice PLD is above it
    assert random_allocation_epsilon(history, 1e-5) >= gaussian_epsilon(2 / 1.5, 1e-5)


def test_epochs_partial_epochs_and_restarts_are_counted():
    acc = RandomAllocationAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=25)  # T = 10: epochs 0, 1 and part of 2
    acc.start_run()
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=5)  # may start mid-epoch: one more epoch
    assert epochs_touched(tuple(acc.history)) == [3, 2]
    restored = accountant_from_state(acc.state_dict())
    assert restored.history == acc.history and restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    one_segment = RandomAllocationAccountant()
    one_segment.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=50)  # 5 epochs, as many as the above
    assert acc.get_epsilon(1e-5) == pytest.approx(one_segment.get_epsilon(1e-5), rel=1e-12)


# Soundness: the certified eps is never below an independent Monte Carlo lower bound on the exact mechanism.
@pytest.mark.parametrize("t", [4, 10, 50])
@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0])
def test_certified_epsilon_is_never_below_the_monte_carlo_lower_bound(t, sigma):
    delta = 1e-3
    history = ((sigma, 1.0 / t, t),)  # one epoch of T steps
    certified = random_allocation_epsilon(history, delta)
    lower = mc_epsilon_lower_bound(noise_multiplier=sigma, steps_per_epoch=t, delta=delta, samples=40_000,
                                   seed=t * 10 + int(sigma * 10))
    assert lower["remove"] > 0.0 and lower["add"] > 0.0  # the lower bounds are informative ...
    assert certified >= lower["epsilon_lower"]  # ... and the certificate is above them, direction by direction
    assert remove_epsilon(history, delta) >= lower["remove"]
    assert jensen_add_epsilon(history, delta) >= lower["add"] and lattice_add_epsilon(history, delta) >= lower["add"]


def test_monte_carlo_lower_bound_catches_an_unsound_epsilon():
    # The check has teeth: eps of the Gaussian with amplification ignored in the other direction (mu = 1/sqrt(T)
    # sigma, i.e. as if the example were spread evenly over the T steps) is too small and is caught.
    t, sigma, delta = 10, 1.0, 1e-3
    too_small = gaussian_epsilon(1.0 / (math.sqrt(t) * sigma), delta)
    lower = mc_epsilon_lower_bound(noise_multiplier=sigma, steps_per_epoch=t, delta=delta, samples=40_000, seed=1)
    assert lower["epsilon_lower"] > too_small


def test_main_job_random_allocation_sits_between_poisson_and_shuffled():
    q, steps, sigma, delta = 256 / 11476, 90, 0.8405, 1e-6
    ra = RandomAllocationAccountant()
    ra.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    shuffled = ShuffledAccountant.for_sampler(num_examples=11476, batch_size=256, steps_per_epoch=45)
    shuffled.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    poisson = PLDAccountant()
    poisson.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert poisson.get_epsilon(delta) < ra.get_epsilon(delta) < shuffled.get_epsilon(delta)
    # the add direction is exactly the shifted Gaussian of the module docstring (2 epochs of T = 45)
    mu, shift = math.sqrt(2 / (45 * sigma**2)), 2 * (1 - 1 / 45) / (2 * sigma**2)
    eps_add = shift + gaussian_epsilon(mu, delta)
    assert jensen_add_epsilon(tuple(ra.history), delta) == pytest.approx(eps_add, rel=1e-12)
    assert lattice_add_epsilon(tuple(ra.history), delta) < eps_add  # the lattice PLD is tighter here
    gauss_delta = norm.cdf(-(eps_add - shift) / mu + mu / 2) - math.exp(eps_add - shift) * norm.cdf(
        -(eps_add - shift) / mu - mu / 2)
    assert gauss_delta <= delta


# ---------------------------------------------------------------- trainer, state, card, report
def test_random_allocation_run_names_its_sampling_and_certifier(tmp_path, caplog):
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                        target_epsilon=8.0, target_delta=1e-5, sampling="random_allocation", noise_seed=0)
    assert trainer.privacy_callback.accountant.name == "random_allocation"
    trainer.train()
    state = trainer.privacy_state()
    assert 0 < state["epsilon"] <= 8.0 and "random-allocation bound" in state["epsilon_certified_by"]
    assert state["accountant"] == "random_allocation" and state["poisson_sampling"] is False
    assert state["sampling_assumed_by_accounting"] == "random_allocation" and "balls-in-bins" in state["sampling_note"]
    add_privacy_to_model_card(str(tmp_path), state)
    meta = read_privacy_metadata(str(tmp_path))
    assert meta["epsilon_is"] == CERTIFIED and "random-allocation bound" in meta["certified_by"]
    assert meta["sampling"] == "random allocation (balls-in-bins)" and meta["adjacency"] == "add-or-remove-one example"
    text = (tmp_path / "README.md").read_text()
    assert "random allocation (balls-in-bins)" in text and "ASSUMES Poisson" not in text
    report = format_privacy_report(state)
    assert report.startswith("Certified guarantee") and "random allocation (balls-in-bins) batches" in report
