"""An independent Monte Carlo LOWER bound on the eps of one epoch of random allocation (soundness checks only).

The mechanism is simulated exactly on the worst-case pair of datasets: the differing example's clipped
gradient is a fixed unit vector, every other gradient is 0, so one epoch outputs ``x = e_J + sigma z``
(``J`` uniform in the T steps, ``z ~ N(0, I_T)``) with the example, and ``x = sigma z`` without it. The exact
privacy loss of the mixture is ``L(x) = log P/Q(x) = log mean_i exp((x_i - 1/2) / sigma^2)``.

For the remove direction ``delta(eps) = E_P[(1 - e^(eps - L))_+]`` and for the add direction
``delta(eps) = E_Q[(1 - e^(eps + L))_+]``. Each sample gives ``f = (1 - e^(...))_+`` in [0, 1]; with an
independent ``U ~ Uniform(0, 1)`` the indicator ``1[U < f]`` is Bernoulli(delta(eps)), so the Clopper-Pearson
interval is exact. The indicators decrease in eps for fixed samples, so the largest eps whose lower
Clopper-Pearson limit still exceeds the target delta is a lower bound on the true eps(delta) with
probability at least ``1 - alpha/2`` (it exceeds the true eps only if the interval fails at the true eps).

Example:
    >>> lo = mc_epsilon_lower_bound(noise_multiplier=1.0, steps_per_epoch=4, delta=1e-2, samples=20_000, seed=0)
    >>> 0.0 <= lo["epsilon_lower"] < 10
    True
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta


def _losses(noise_multiplier: float, steps_per_epoch: int, samples: int, rng: np.random.Generator, *,
            with_example: bool) -> np.ndarray:
    sigma, t = float(noise_multiplier), int(steps_per_epoch)
    x = sigma * rng.standard_normal((samples, t))
    if with_example:
        x[:, 0] += 1.0  # by symmetry the allocated step may be fixed
    return logsumexp((x - 0.5) / sigma**2, axis=1) - np.log(t)


def _cp_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(alpha / 2.0, k, n - k + 1))


def mc_epsilon_lower_bound(*, noise_multiplier: float, steps_per_epoch: int, delta: float, samples: int = 100_000,
                           alpha: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Lower bounds (confidence ``1 - alpha/2`` each) on eps(delta) of one epoch, per direction and overall.

    Returns:
        ``{"remove": eps_lo, "add": eps_lo, "epsilon_lower": max of both}``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for direction, with_example, sign in (("remove", True, 1.0), ("add", False, -1.0)):
        loss = sign * _losses(noise_multiplier, steps_per_epoch, samples, rng, with_example=with_example)
        u = rng.random(samples)

        def lower(eps: float) -> float:
            f = -np.expm1(np.minimum(eps - loss, 700.0))  # 1 - e^(eps - loss)
            return _cp_lower(int(np.count_nonzero(u < f)), samples, alpha)

        if lower(0.0) <= delta:
            out[direction] = 0.0
            continue
        lo, hi = 0.0, float(np.max(loss)) + 1.0  # lower(hi) = 0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if lower(mid) > delta else (lo, mid)
        out[direction] = lo
    out["epsilon_lower"] = max(out["remove"], out["add"])
    return out


__all__ = ["mc_epsilon_lower_bound"]
