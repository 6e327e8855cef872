"""Poisson batch sampler: distribution, independence, micro-batch split across ranks, epochs."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sampling import (
    DPDataLoader,
    EmptyAwareCollator,
    PoissonBatchSampler,
    is_empty_batch,
    steps_per_epoch_for,
)


def _logical(sampler: PoissonBatchSampler, epochs: int) -> list[torch.Tensor]:
    out = []
    for e in range(epochs):
        out.extend(sampler.logical_batches(e))
    return out


def test_inclusion_frequency_matches_q():
    n, q = 200, 0.1
    s = PoissonBatchSampler(n, q, num_micro_batches=1, seed=123)
    batches = _logical(s, 30)  # 300 steps
    t = len(batches)
    counts = torch.zeros(n)
    for b in batches:
        counts[b] += 1
    # Overall rate: sd of the mean inclusion = sqrt(q(1-q)/(n t)) ~ 0.0012; allow 5 sd.
    assert abs(counts.sum().item() / (n * t) - q) < 5 * math.sqrt(q * (1 - q) / (n * t))
    # Per-example counts ~ Binomial(t, q): chi-square over examples, df = n.
    chi2 = (((counts - t * q) ** 2) / (t * q * (1 - q))).sum().item()
    assert n - 5 * math.sqrt(2 * n) < chi2 < n + 5 * math.sqrt(2 * n)
    # Batch sizes vary (Poisson, not fixed).
    sizes = {len(b) for b in batches}
    assert len(sizes) > 5


def test_independence_across_steps():
    n, q = 300, 0.2
    s = PoissonBatchSampler(n, q, num_micro_batches=1, seed=7)
    masks = []
    for b in _logical(s, 20):  # 100 steps
        m = torch.zeros(n, dtype=torch.bool)
        m[b] = True
        masks.append(m)
    masks = torch.stack(masks).float()
    both = (masks[1:] * masks[:-1]).mean().item()  # P(in step t and t+1) should be q^2
    k = masks[1:].numel()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / k)


def test_exactly_ga_times_world_micro_batches_including_empty():
    n, q, ga = 100, 0.02, 4  # ~2 examples per logical batch split into 4 micro-batches: many empty ones
    s = PoissonBatchSampler(n, q, num_micro_batches=ga, seed=1)
    micro = list(s)
    assert len(micro) == len(s) == steps_per_epoch_for(q) * ga == 50 * ga
    assert any(len(m) == 0 for m in micro)
    # Re-assemble the logical batches: each group of ga micro-batches is one Bernoulli draw.
    logical = list(s.logical_batches())
    for t, batch in enumerate(logical):
        joined = [i for m in micro[t * ga:(t + 1) * ga] for i in m]
        assert sorted(joined) == sorted(batch.tolist())


def test_same_global_draw_on_all_ranks_and_slices_partition_it():
    n, q, w, ga = 90, 0.3, 3, 2
    samplers = [PoissonBatchSampler(n, q, num_micro_batches=w * ga, rank=r, world_size=w, seed=99) for r in range(w)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == samplers[0].steps_per_epoch * ga
    logical = list(samplers[0].logical_batches())
    for r in range(1, w):
        assert all(torch.equal(a, b) for a, b in zip(logical, samplers[r].logical_batches()))
    for t, batch in enumerate(logical):
        pieces = [i for r in range(w) for m in per_rank[r][t * ga:(t + 1) * ga] for i in m]
        assert len(pieces) == len(set(pieces)) == len(batch)
        assert set(pieces) == set(batch.tolist())


def test_per_epoch_redraw_and_replay():
    s = PoissonBatchSampler(50, 0.2, num_micro_batches=1, seed=5)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0  # same (seed, epoch): same draws
    assert e0 != e1  # a new epoch is a new draw
    other = PoissonBatchSampler(50, 0.2, num_micro_batches=1, seed=6)
    assert list(other) != e0


def test_default_seed_is_fresh_entropy():
    a = PoissonBatchSampler(1000, 0.1, num_micro_batches=1)
    b = PoissonBatchSampler(1000, 0.1, num_micro_batches=1)
    assert a.seed != b.seed


def test_fixed_size_mode():
    n, q, ga = 20, 0.3, 2  # B = 6, steps = round(1/0.3) = 3
    s = PoissonBatchSampler(n, q, num_micro_batches=ga, seed=0, poisson=False)
    logical = list(s.logical_batches())
    assert len(logical) == 3 and all(len(b) == 6 for b in logical)
    assert all(len(set(b.tolist())) == 6 for b in logical)
    micro = list(s)
    assert [len(m) for m in micro] == [3] * 6


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_samples=10, sample_rate=1.5), dict(num_samples=10, sample_rate=0.0), dict(num_samples=0, sample_rate=0.5)],
)
def test_bad_rates_raise(kwargs):
    with pytest.raises(PrivacyConfigError):
        PoissonBatchSampler(**kwargs, num_micro_batches=1)


def test_rank_and_micro_batch_checks():
    with pytest.raises(PrivacyConfigError):
        PoissonBatchSampler(10, 0.5, num_micro_batches=3, world_size=2, rank=0)
    with pytest.raises(PrivacyConfigError):
        PoissonBatchSampler(10, 0.5, num_micro_batches=2, world_size=2, rank=2)


def test_dataloader_yields_empty_markers_with_hf_dataset():
    from datasets import Dataset
    from transformers import default_data_collator

    ds = Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(40)], "labels": list(range(40))})
    s = PoissonBatchSampler(40, 0.05, num_micro_batches=4, seed=3)
    dl = DPDataLoader(ds, batch_sampler=s, collate_fn=EmptyAwareCollator(default_data_collator))
    batches = list(dl)
    assert len(batches) == len(dl) == 20 * 4
    empties = [b for b in batches if is_empty_batch(b)]
    full = [b for b in batches if not is_empty_batch(b)]
    assert empties and full
    assert all(b["input_ids"].shape[1] == 2 for b in full)
    dl.set_epoch(1)
    assert s.epoch == 1
