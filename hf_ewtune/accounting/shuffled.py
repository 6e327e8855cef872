"""Certified accounting for shuffled fixed-size batches (``poisson_sampling=False``), without amplification.

What the sampler does (:class:`hf_ewtune.sampling.PoissonBatchSampler` with ``poisson=False``): each epoch
draws ONE random permutation of the N examples (a fresh one per epoch) and step ``s`` takes its block
``[s b, (s+1) b)``; the last block of the epoch is shorter when ``steps_per_epoch * b > N`` (and some
examples sit the epoch out when it is < N). So an example occurs at most once per epoch and per batch
(``P = M = 1``). Only a sampler configured with more steps than one permutation can fill (last block empty:
``(steps_per_epoch - 1) b >= N``, never the case for DPTrainer's ``round(N/b)`` steps) reads consecutive blocks
of a stream of permutations instead, and then ``P = ceil(steps_per_epoch * b / N)`` and ``M <= 2``.

Adjacency: **replace-one example** (datasets of the same size N differing in one record). Both datasets are
run with the same permutations (the sampler only sees indices), so exactly the batches holding the replaced
index differ, each by that one record. Each example's gradient is clipped to norm C, so a batch holding it
``m`` times changes the clipped sum by at most ``2 m C``; the noise is ``N(0, (sigma C)^2)`` once per step
and the division by the public batch size is post-processing. (Under add-or-remove-one the fixed batch size
makes the added example displace another one, also a change of 2C, and N also sets the number of steps, so
no smaller sensitivity is available; we state replace-one.)

Composition: by the Gaussian-DP composition theorem (Dong, Roth & Su 2019) the run is ``mu``-GDP with
``mu^2 = sum_t (2 m_t / sigma_t)^2 <= sum_segments 4 M K / sigma^2``, where ``K`` bounds the occurrences of one
example in the segment: ``P`` per epoch touched, partial epochs counting in full (a segment that may start
mid-epoch, i.e. every segment but the first, counts one more epoch). The epsilon at delta is the exact
privacy profile of the Gaussian mechanism (Balle & Wang 2018): ``delta(eps) = Phi(-eps/mu + mu/2) -
e^eps Phi(-eps/mu - mu/2)``, solved for eps and rounded up. No subsampling amplification is used.

Example:
    >>> acc = ShuffledAccountant(steps_per_epoch=45)
    >>> acc.step(noise_multiplier=2.0, sample_rate=256 / 11476, num_steps=90)   # 2 epochs
    >>> round(acc.get_epsilon(delta=1e-6), 3) == round(gaussian_epsilon(2 * 2 ** 0.5 / 2.0, 1e-6), 3)
    True
"""

from __future__ import annotations

import math
from typing import Any

from scipy.optimize import brentq
from scipy.stats import norm

from hf_ewtune.errors import PrivacyConfigError

from ._validation import check_delta
from .base import Accountant
from .report import PrivacyReport, report_without_edgeworth

ADJACENCY = "replace-one example"
SAMPLING = "shuffled fixed-size batches"


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact privacy profile of the Gaussian mechanism with ``mu = sensitivity / noise std`` (Balle & Wang 2018).

    Example:
        >>> round(gaussian_delta(1.0, 1.0), 6)   # Phi(-0.5) - e Phi(-1.5)
        0.126937
    """
    if mu <= 0:
        return 0.0
    a = -epsilon / mu + mu / 2.0
    b = -epsilon / mu - mu / 2.0
    return float(norm.cdf(a) - math.exp(min(epsilon + norm.logcdf(b), 700.0)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 with ``gaussian_delta(mu, epsilon) <= delta`` (rounded up; ``inf`` for ``mu = inf``).

    Example:
        >>> round(gaussian_epsilon(1.0, 0.1269367), 4)
        1.0
    """
    delta = check_delta(delta)
    if math.isinf(mu):
        return math.inf
    if mu <= 0 or gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = mu * mu / 2.0 + mu * 40.0 + 10.0  # delta(hi) < Phi(-40) ~ 1e-350 < any accepted delta
    eps = float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))
    step = 1e-12 * max(1.0, eps)
    while gaussian_delta(mu, eps) > delta:  # make sure the root is on the safe side
        eps += step
        step *= 2.0
    return eps


def shuffled_participation(*, num_examples: int, batch_size: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(P, M)``: most occurrences of one example per epoch and in one batch, for the shuffled sampler.

    Example:
        >>> shuffled_participation(num_examples=11476, batch_size=256, steps_per_epoch=45)  # one permutation
        (1, 1)
        >>> shuffled_participation(num_examples=100, batch_size=30, steps_per_epoch=5)  # 4 blocks fill it: a stream
        (2, 2)
    """
    n, b, spe = int(num_examples), int(batch_size), int(steps_per_epoch)
    if n < 1 or not 1 <= b <= n or spe < 1:
        raise PrivacyConfigError(
            f"need num_examples >= batch_size >= 1 and steps_per_epoch >= 1, got {n}, {b}, {spe}."
        )
    if epoch_fits_one_permutation(num_examples=n, batch_size=b, steps_per_epoch=spe):
        return 1, 1
    per_epoch = -(-spe * b // n)  # permutations the epoch reads from
    return per_epoch, 2


def epoch_fits_one_permutation(*, num_examples: int, batch_size: int, steps_per_epoch: int) -> bool:
    """Whether the shuffled sampler cuts each epoch from ONE permutation (every block non-empty).

    Example:
        >>> epoch_fits_one_permutation(num_examples=11476, batch_size=256, steps_per_epoch=45)
        True
    """
    return (int(steps_per_epoch) - 1) * int(batch_size) < int(num_examples)


class ShuffledAccountant(Accountant):
    """Certified accountant for shuffled fixed-size batches (no amplification; see the module docstring).

    Args:
        steps_per_epoch: optimizer steps per epoch (the sampler's ``steps_per_epoch``).
        participations_per_epoch: most occurrences of one example in one epoch (``P``).
        max_per_step: most occurrences of one example in one batch (``M``).

    Use :meth:`for_sampler` to derive ``P`` and ``M`` from N, the batch size and the steps per epoch.
    """

    name = "shuffled"
    #: the sampling this accountant certifies (named in logs)
    sampling = f"{SAMPLING} (no amplification)"

    def __init__(self, *, steps_per_epoch: int, participations_per_epoch: int = 1, max_per_step: int = 1) -> None:
        super().__init__()
        for key, value in (("steps_per_epoch", steps_per_epoch), ("participations_per_epoch", participations_per_epoch),
                           ("max_per_step", max_per_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivacyConfigError(f"{key} must be an integer >= 1, got {value!r}.")
        if max_per_step > participations_per_epoch:
            raise PrivacyConfigError(
                f"max_per_step ({max_per_step}) cannot exceed participations_per_epoch ({participations_per_epoch})."
            )
        self.steps_per_epoch = int(steps_per_epoch)
        self.participations_per_epoch = int(participations_per_epoch)
        self.max_per_step = int(max_per_step)

    @classmethod
    def for_sampler(cls, *, num_examples: int, batch_size: int, steps_per_epoch: int) -> "ShuffledAccountant":
        """The accountant for the shuffled sampler over ``num_examples`` with batches of ``batch_size``.

        Example:
            >>> ShuffledAccountant.for_sampler(num_examples=100, batch_size=10, steps_per_epoch=10).options()
            {'steps_per_epoch': 10, 'participations_per_epoch': 1, 'max_per_step': 1}
        """
        per_epoch, per_step = shuffled_participation(
            num_examples=num_examples, batch_size=batch_size, steps_per_epoch=steps_per_epoch)
        return cls(steps_per_epoch=steps_per_epoch, participations_per_epoch=per_epoch, max_per_step=per_step)

    def options(self) -> dict[str, Any]:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "participations_per_epoch": self.participations_per_epoch,
            "max_per_step": self.max_per_step,
        }

    # ---- runs: a restart may begin mid-epoch, so its steps are kept in a segment of their own
    def start_run(self) -> None:
        """Mark the start of a training run (or resume): the next steps open a new segment."""
        self._merge_next = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._merge_next = False  # steps after a restore belong to a new run

    def _load_segment(self, sigma: float, q: float, n: int) -> None:
        self._merge_next = False  # saved segments stay apart (each may start mid-epoch)
        self.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)

    # ---- epsilon
    def epochs_touched(self, history: tuple | None = None) -> list[int]:
        """Per segment, the epochs it may touch: ``ceil(steps / steps_per_epoch)``, plus one after the first."""
        history = tuple(self._history) if history is None else history
        spe = self.steps_per_epoch
        return [-(-int(n) // spe) + (1 if i else 0) for i, (_, _, n) in enumerate(history)]

    def mu(self, history: tuple | None = None) -> float:
        """GDP parameter of the run: ``sqrt(sum_segments 4 M P epochs / sigma^2)`` (``inf`` without noise)."""
        history = tuple(self._history) if history is None else history
        total = 0.0
        for (sigma, _, _), epochs in zip(history, self.epochs_touched(history)):
            if sigma == 0.0:
                return math.inf
            occurrences = self.participations_per_epoch * epochs
            total += 4.0 * self.max_per_step * occurrences / (sigma * sigma)
        return math.sqrt(total)

    @property
    def certified_by(self) -> str:
        return (
            f"hf_ewtune shuffled-batch bound (no amplification): Gaussian-DP composition over the epochs, "
            f"{ADJACENCY} (sensitivity 2C per occurrence), at most {self.participations_per_epoch} occurrence(s) "
            f"per example per epoch of {self.steps_per_epoch} steps and {self.max_per_step} per step; exact "
            "Gaussian privacy profile (Balle & Wang 2018)"
        )

    def _certified_epsilon(self, history, delta):
        return gaussian_epsilon(self.mu(history), delta)

    def get_privacy_spent(self, delta: float = 1e-5) -> PrivacyReport:
        """The certified epsilon; no Edgeworth estimate (it models Poisson sampling, not shuffling)."""
        return report_without_edgeworth(
            self, delta, run_was="was shuffled", adjacency=ADJACENCY, sampling=self.sampling)
