"""An independent LOWER bound on epsilon: dp-accounting's optimistic PLD (``pessimistic_estimate=False``).

The optimistic discretisation rounds every privacy loss down and drops the truncated tail mass, so the
epsilon it reports is at most the true epsilon of the Poisson-subsampled Gaussian (add-or-remove-one).
Used to test that certified upper bounds (PLD, the saddle-point bound) are never below it.
"""

from __future__ import annotations

import math
from typing import Sequence


def optimistic_pld_epsilon(
    history: Sequence[Sequence[float]], delta: float, *, value_discretization_interval: float = 1e-4
) -> float:
    """Lower bound on the true epsilon for segments ``(noise_multiplier, sample_rate, num_steps)``.

    The optimistic discretisation is loose (each of the ``n`` losses is rounded down by up to
    ``value_discretization_interval``), but it is a lower bound, independent of our own numerics.

    Example:
        >>> lower = optimistic_pld_epsilon([(2.0, 0.01, 3000)], 1e-5)
        >>> 0.9 < lower < 1.1196   # pessimistic (certified) PLD: 1.1196; rounding every loss down costs ~n * vdi / 2
        True
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    total = None
    for sigma, q, n in history:
        if int(n) <= 0:
            continue
        if float(sigma) == 0.0:
            return math.inf
        pld = pld_lib.from_gaussian_mechanism(
            standard_deviation=float(sigma),
            sensitivity=1.0,
            pessimistic_estimate=False,
            value_discretization_interval=value_discretization_interval,
            sampling_prob=float(q),
            use_connect_dots=False,  # connect-the-dots has no optimistic mode; privacy buckets does
        ).self_compose(int(n))
        total = pld if total is None else total.compose(pld)
    return 0.0 if total is None else float(total.get_epsilon_for_delta(delta))
