"""Generators reseeded per step/epoch use every bit of their seed parts (torch's CPU manual_seed keeps 32).

Before the fix, the noise of step ``t`` came from ``manual_seed(derive_seed(base, t))``: two steps whose 63-bit
derived seeds agreed in their low 32 bits (probability ~ steps^2 / 2^33 over a run) drew the same noise, which
releases the exact difference of their clipped gradient sums.
"""

from __future__ import annotations

import torch

import hf_ewtune.noise as noise_module
from hf_ewtune.noise import DPOptimizer
from hf_ewtune.rng import seeded_generator
from hf_ewtune.sampling import PoissonBatchSampler


def test_torch_manual_seed_keeps_only_32_bits_on_cpu():
    """The torch behaviour this module exists for (if torch ever changes it, the fix stays correct)."""
    a = torch.randn(8, generator=torch.Generator().manual_seed(11))
    b = torch.randn(8, generator=torch.Generator().manual_seed(11 + 2**32))
    assert torch.equal(a, b)


def test_parts_differing_only_above_bit_32_give_different_streams():
    a = torch.randn(8, generator=seeded_generator("cpu", 11, 0))
    b = torch.randn(8, generator=seeded_generator("cpu", 11, 2**32))
    c = torch.randn(8, generator=seeded_generator("cpu", 11 + 2**32, 0))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.randn(8, generator=seeded_generator("cpu", 11, 0)))  # reproducible


def test_noise_of_two_steps_differs_even_if_their_derived_seeds_share_the_low_32_bits(monkeypatch):
    # Simulate the collision: derived seeds of steps 0 and 1 differ only above bit 32. The old code seeded the
    # step's generator with manual_seed(derive_seed(...)) and drew the same noise for both steps.
    monkeypatch.setattr(noise_module, "derive_seed", lambda *parts: 12345 + (int(parts[1]) << 32), raising=False)
    p = torch.nn.Parameter(torch.zeros(64))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=1.0,
                      noise_seed=3)
    draws = [torch.randn(64, generator=opt._generator(torch.device("cpu"), step)) for step in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    noisy = []
    for _ in range(2):
        p.grad = torch.zeros(64)
        opt.step()
        noisy.append(p.detach().clone())
        p.data.zero_()
    assert not torch.equal(noisy[0], noisy[1])


def test_poisson_epochs_draw_different_batches_even_if_seeds_collide_in_32_bits(monkeypatch):
    import hf_ewtune.sampling as sampling_module

    # As above: the old sampler seeded each epoch with manual_seed(derive_seed(seed, epoch)).
    monkeypatch.setattr(sampling_module, "derive_seed", lambda *parts: 777 + (int(parts[-1]) << 32))
    s = PoissonBatchSampler(200, 0.3, num_micro_batches=1, rank=0, world_size=1, seed=5)
    first = [b.tolist() for b in s.logical_batches(0)]
    second = [b.tolist() for b in s.logical_batches(1)]
    assert first != second
    assert first == [b.tolist() for b in s.logical_batches(0)]
