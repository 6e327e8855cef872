"""Bounded certified PLD queries: a grid-size budget, a coarser grid, or a labelled RDP fallback.

dp-accounting's PLD accountant represents the privacy-loss distribution on a grid of step
``value_discretization_interval``; its size grows with the range of one step's privacy loss (about
``mu^2`` for ``mu = 1/sigma``) and with the spread of the composed loss (about ``sqrt(steps)``). For tiny
noise or very long runs the grid needs billions of points (a 38 GiB allocation for ``sigma = 1e-3``).

:func:`hf_ewtune.accounting.certified.certified_pld_epsilon` estimates the grid size from the cumulants of the privacy loss before
building anything and, when it exceeds :data:`POINTS_MAX`:

* uses a coarser discretization (still a pessimistic, hence certified, upper bound: only looser) if one
  of at most :data:`VDI_MAX` fits, and also computes dp-accounting's RDP bound, returning the smaller;
* otherwise returns dp-accounting's RDP bound (certified, looser; its cost does not depend on the number
  of steps).

The returned label always names what certified the number, and why the default grid was not used.
Nothing here returns an uncertified value.

Example:
    >>> from hf_ewtune.accounting.certified import certified_pld_epsilon
    >>> eps, label = certified_pld_epsilon([(1.0, 0.01, 1000)], 1e-5)
    >>> round(eps, 2), "PLD" in label
    (1.83, True)
    >>> eps, label = certified_pld_epsilon([(1.0, 0.01, 10**9)], 1e-5)
    >>> label.split(" (")[0].endswith("RDP"), "fallback" in label
    (True, True)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: Largest estimated PLD cost (grid points, see :func:`pld_grid_points`) of one query: at most a few hundred MB
#: and a few seconds (the default 1e-4 grid of EW-Tune's SST-2 setting costs ~1.1e6).
POINTS_MAX = 2_000_000
#: Building one step's PLD costs several times more per point than composing (inverse-CDF evaluations).
STEP_WEIGHT = 4.0
#: Coarsest value discretization used before falling back to RDP.
VDI_MAX = 1e-2
#: Longest history (steps) given to the PLD accountant; longer ones get the RDP bound (dp-accounting's PLD
#: self-composition stalls around 1e9 steps even on a coarse grid).
MAX_PLD_STEPS = 10**8
#: Standard deviations of the privacy loss kept on the grid (dp-accounting truncates ~1e-15 tails).
TAIL_SDS = 10.0


def pld_grid_points(history: Sequence[Sequence[float]], value_discretization_interval: float) -> float:
    """Estimated number of grid points dp-accounting's PLD needs for ``history`` at this discretization.

    Per segment: :data:`STEP_WEIGHT` times one step's privacy-loss range (over ``z`` in [-10, mu + 10]) plus
    the spread of the composed loss (``2 * 10 * sqrt(steps * kappa_2)``); summed over segments (each is built
    and self-composed separately), plus the spread of the whole composition.

    Example:
        >>> 5e5 < pld_grid_points([(0.7865, 0.029696, 660)], 1e-4) < POINTS_MAX
        True
    """
    from .cumulants import pllr, step_cumulants

    total = 0.0
    variance = 0.0
    for sigma, q, n in history:
        sigma, q, n = float(sigma), float(q), int(n)
        if n <= 0:
            continue
        c = step_cumulants(q, sigma)
        mu = 1.0 / sigma
        loss = pllr(np.array([-TAIL_SDS, mu + TAIL_SDS]), sample_rate=q, noise_multiplier=sigma)
        step_range = float(loss[1] - loss[0])
        var = n * max(c.x.kappa2, c.y.kappa2)
        variance += var
        total += STEP_WEIGHT * step_range + 2.0 * TAIL_SDS * math.sqrt(var)
    return (total + 2.0 * TAIL_SDS * math.sqrt(variance)) / float(value_discretization_interval)


def _ceil_1sig(value: float) -> float:
    """``value`` rounded UP to one significant digit (a coarser grid is still an upper bound)."""
    exponent = math.floor(math.log10(value))
    return math.ceil(value / 10.0**exponent - 1e-9) * 10.0**exponent
