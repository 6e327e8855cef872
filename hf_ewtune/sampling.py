"""Poisson sampling of logical batches, split into a fixed number of micro-batches per rank.

Each logical batch (one optimizer step) is ONE Bernoulli(q) draw over the whole training set — the same
draw on every rank, since all ranks seed their generator identically. The drawn indices are dealt to the
ranks (rank ``r`` takes ``L[r::W]``) and each rank's share is cut into exactly ``GA`` micro-batches, some
possibly empty, so that every rank runs the same number of micro-steps (and collectives). Empty
micro-batches are yielded as empty lists; :class:`EmptyAwareCollator` turns them into an empty-marker
batch that ``DPTrainer.training_step`` recognises. A logical batch is never re-drawn.

Steps per epoch: ``round(1/q)`` (at least 1), so one "epoch" processes N examples in expectation. Each
epoch uses a generator seeded from ``(seed, epoch)``, so epochs are independent draws and a resumed run
with a fixed seed reproduces the same draws as the uninterrupted one (with the default entropy seed a
resumed run simply continues with fresh draws).

With ``poisson=False`` the logical batches are shuffled batches of ``b = round(q N)`` examples: each epoch
cuts ONE fresh random permutation into consecutive blocks of ``b`` (the last block shorter when
``steps_per_epoch * b > N``), so an example occurs at most once per epoch. They are accounted by
:class:`hf_ewtune.accounting.ShuffledAccountant` (a certified bound without amplification, replace-one
adjacency). Only a sampler given more steps than one permutation can fill (an empty last block) reads a
stream of permutations instead (see :func:`hf_ewtune.accounting.shuffled.shuffled_participation`).

With ``sampling="random_allocation"`` (balls-in-bins) every example is put in ONE step of the epoch, drawn
uniformly and independently for each example and each epoch: every example is used exactly once per epoch and
the batch sizes vary (Binomial(N, 1/T)). The noise and the normalisation use the expected batch size, as for
Poisson. Accounted by :class:`hf_ewtune.accounting.random_allocation.RandomAllocationAccountant`.

Example:
    >>> s = PoissonBatchSampler(100, 0.1, num_micro_batches=2, seed=0)
    >>> len(s)  # 10 steps per epoch x 2 micro-batches
    20
    >>> batches = list(s)
    >>> len(batches), all(isinstance(b, list) for b in batches)
    (20, True)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.rng import seeded_generator

EMPTY_BATCH_KEY = "__hf_ewtune_empty_batch__"
#: The batch samplings DPTrainer offers (``PrivacyArguments.sampling``), each with its certified accountant.
SAMPLINGS = ("poisson", "shuffled", "random_allocation")
#: Under FSDP2, the empty marker also carries one collated dummy row under this key (a zero-weight forward keeps
#: the ranks' all-gathers in step; its contribution is exactly zero).
DUMMY_ROW_KEY = "__hf_ewtune_dummy_row__"


def steps_per_epoch_for(sample_rate: float) -> int:
    """Optimizer steps in one epoch for sample rate ``q``: ``max(1, round(1/q))``.

    Example:
        >>> steps_per_epoch_for(0.01), steps_per_epoch_for(0.3), steps_per_epoch_for(1.0)
        (100, 3, 1)
    """
    return max(1, int(round(1.0 / sample_rate)))


def resolve_sampling(sampling: str | None, *, poisson: bool = True, argument: str = "sampling") -> str:
    """The sampling mode: ``sampling`` if given, else ``"poisson"`` / ``"shuffled"`` from the ``poisson`` flag.

    Raises:
        PrivacyConfigError: an unknown mode, or ``poisson=False`` together with a mode other than ``"shuffled"``.

    Example:
        >>> resolve_sampling(None, poisson=False), resolve_sampling("random_allocation")
        ('shuffled', 'random_allocation')
    """
    if sampling is None:
        return "poisson" if poisson else "shuffled"
    if sampling not in SAMPLINGS:
        raise PrivacyConfigError(f"{argument} must be one of {list(SAMPLINGS)} (or None), got {sampling!r}.")
    if not poisson and sampling != "shuffled":
        raise PrivacyConfigError(
            f"{argument}={sampling!r} contradicts poisson_sampling=False (which means shuffled batches); leave "
            f"poisson_sampling at its default True when choosing {argument}.")
    return sampling


def new_seed() -> int:
    """A fresh 63-bit seed from OS entropy (``secrets``): unpredictable, but the generators are not CSPRNGs."""
    return secrets.randbits(63)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (e.g. ``(seed, epoch)``) with numpy's ``SeedSequence``."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class PoissonBatchSampler(Sampler[list[int]]):
    """Rank-aware batch sampler: one Poisson draw per logical batch, split into GA x W micro-batches.

    Args:
        num_samples: Training-set size N.
        sample_rate: Inclusion probability q in (0, 1].
        num_micro_batches: Micro-batches per logical batch over all ranks (``GA * world_size``); must be a
            multiple of ``world_size``.
        rank: This process's rank.
        world_size: Number of processes W.
        steps_per_epoch: Logical batches per epoch (default ``round(1/q)``).
        seed: Seed shared by all ranks (default: fresh OS entropy; in multi-process runs pass the seed
            broadcast from rank 0).
        poisson: ``False`` gives shuffled fixed-size batches of ``round(q N)`` examples instead.
        sampling: ``"poisson"``, ``"shuffled"`` or ``"random_allocation"`` (overrides ``poisson``; giving
            ``poisson=False`` with another sampling than ``"shuffled"`` is refused).

    Example:
        >>> s = PoissonBatchSampler(10, 0.5, num_micro_batches=4, rank=1, world_size=2, seed=3)
        >>> len(s)  # 2 steps x 2 micro-batches on this rank
        4
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        num_micro_batches: int,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        poisson: bool = True,
        sampling: str | None = None,
    ) -> None:
        if num_samples <= 0:
            raise PrivacyConfigError(f"num_samples must be > 0, got {num_samples}.")
        if not 0.0 < sample_rate <= 1.0:
            raise PrivacyConfigError(
                f"sample_rate must be in (0, 1], got {sample_rate}: the expected batch size "
                "(per_device_train_batch_size x gradient_accumulation_steps x world_size) exceeds the dataset size."
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise PrivacyConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
        if num_micro_batches < world_size or num_micro_batches % world_size:
            raise PrivacyConfigError(
                f"num_micro_batches ({num_micro_batches}) must be a positive multiple of world_size ({world_size})."
            )
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.num_micro_batches = int(num_micro_batches)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.micro_batches_per_rank = self.num_micro_batches // self.world_size
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch is not None else steps_per_epoch_for(sample_rate)
        if self.steps_per_epoch < 1:
            raise PrivacyConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.seed = int(seed) if seed is not None else new_seed()
        self.sampling = resolve_sampling(sampling, poisson=poisson)
        self.poisson = self.sampling == "poisson"
        self.fixed_batch_size = max(1, int(round(self.sample_rate * self.num_samples)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the next iteration yields (called by the Trainer)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches_per_rank

    def logical_batches(self, epoch: int | None = None) -> Iterator[torch.Tensor]:
        """The global logical batches (index tensors, identical on every rank) of an epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        gen = seeded_generator("cpu", self.seed, epoch)  # all bits of (seed, epoch): see hf_ewtune.rng
        if self.poisson:
            for _ in range(self.steps_per_epoch):
                mask = torch.rand(self.num_samples, generator=gen) < self.sample_rate
                yield mask.nonzero().flatten()
            return
        if self.sampling == "random_allocation":
            bins = torch.randint(self.steps_per_epoch, (self.num_samples,), generator=gen)
            order = torch.argsort(bins, stable=True)
            counts = torch.bincount(bins, minlength=self.steps_per_epoch).tolist()
            yield from torch.split(order, counts)
            return
        b, n = self.fixed_batch_size, self.num_samples
        if (self.steps_per_epoch - 1) * b < n:  # one permutation per epoch: each example at most once
            perm = torch.randperm(n, generator=gen)
            for s in range(self.steps_per_epoch):
                yield perm[s * b : (s + 1) * b]
            return
        stream = torch.empty(0, dtype=torch.long)  # more steps than one permutation fills
        for _ in range(self.steps_per_epoch):
            while stream.numel() < b:
                stream = torch.cat([stream, torch.randperm(n, generator=gen)])
            batch, stream = stream[:b], stream[b:]
            yield batch

    def split(self, logical_batch: torch.Tensor) -> list[list[int]]:
        """This rank's ``GA`` micro-batches (lists, possibly empty) of one logical batch."""
        local = logical_batch[self.rank :: self.world_size]
        return [chunk.tolist() for chunk in torch.tensor_split(local, self.micro_batches_per_rank)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.logical_batches():
            yield from self.split(batch)


class EmptyAwareCollator:
    """Wrap a collate function so that an empty micro-batch becomes ``{EMPTY_BATCH_KEY: True}``.

    With ``dummy_features`` (FSDP2), the marker also holds ``collate_fn(dummy_features)`` under
    :data:`DUMMY_ROW_KEY`: the rank runs it with weight 0 so that its forwards match the other ranks'.

    Example:
        >>> c = EmptyAwareCollator(lambda feats: {"n": len(feats)})
        >>> c([]), c([1, 2])
        ({'__hf_ewtune_empty_batch__': True}, {'n': 2})
        >>> EmptyAwareCollator(lambda feats: {"n": len(feats)}, dummy_features=[7])([])[DUMMY_ROW_KEY]
        {'n': 1}
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], *, dummy_features: list[Any] | None = None) -> None:
        self.collate_fn = collate_fn
        self.dummy_features = dummy_features

    def __call__(self, features: list[Any]) -> Any:
        if len(features) == 0:
            if self.dummy_features is not None:
                return {EMPTY_BATCH_KEY: True, DUMMY_ROW_KEY: self.collate_fn(list(self.dummy_features))}
            return {EMPTY_BATCH_KEY: True}
        return self.collate_fn(features)


def is_empty_batch(batch: Any) -> bool:
    """Whether ``batch`` is the empty-micro-batch marker produced by :class:`EmptyAwareCollator`."""
    return isinstance(batch, Mapping) and bool(batch.get(EMPTY_BATCH_KEY, False))


class DPDataLoader(torch.utils.data.DataLoader):
    """A plain ``DataLoader`` whose ``set_epoch`` reaches the :class:`PoissonBatchSampler`.

    It is deliberately NOT passed through ``accelerator.prepare`` (whose ``BatchSamplerShard`` would deal
    whole batches to ranks round-robin); the sampler already is rank-aware.
    """

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
