"""Certified accounting for random allocation ("balls-in-bins") sampling, add-or-remove-one adjacency.

What the sampler does (:class:`hf_ewtune.sampling.PoissonBatchSampler` with ``sampling="random_allocation"``):
each epoch has ``T = round(1/q)`` steps and every example is put in ONE step of the epoch drawn uniformly and
independently (fresh draws every epoch), so each example is used exactly once per epoch. The noisy sum of the
clipped gradients (noise ``N(0, (sigma C)^2)`` per step) is divided by the public expected batch size.

Why the bound below holds, line by line (units: gradients divided by C, noise std sigma):

1. **Dominating pair of one epoch.** For adaptive DP-SGD with random allocation over T steps, the pair
   ``P = (1/T) sum_i N(e_i, sigma^2 I_T)`` (with the example) and ``Q = N(0, sigma^2 I_T)`` (without it) is a
   dominating pair for add-or-remove-one (Chua et al., "Balls-and-Bins Sampling for DP-SGD", AISTATS 2025,
   arXiv 2412.16802, the tightly dominating pair of ABLQ_B; Feldman & Shenfeld, "Privacy amplification by
   random allocation", arXiv 2502.08202, reduce to the same pair). The other examples' allocations are
   independent of the differing one, so they only mix shifted copies of this pair (joint convexity of the
   hockey-stick divergence).
2. **Epochs compose.** Epochs use independent allocations; by the adaptive composition of dominating pairs
   (Zhu, Dong & Wang, AISTATS 2022) and of Renyi divergences (Mironov 2017) the run is bounded by the E-fold
   product. A partial epoch releases a prefix of a full epoch (post-processing), so it counts as a full one.
   Per history segment ``E = ceil(steps / T)``, plus one for every segment after the first (a resumed run may
   begin mid-epoch), as in :class:`~hf_ewtune.accounting.ShuffledAccountant`.
3. **Remove direction, P against Q: exact Renyi divergence at integer orders.** With ``Y_i = exp((x_i - 1/2)
   / sigma^2)`` and x ~ Q, ``P/Q(x) = (1/T) sum_i Y_i``; the Y_i are iid with ``E[Y^k] = exp(k (k-1) /
   (2 sigma^2))``. Hence ``D_a(P||Q) = (log E[(Y_1 + ... + Y_T)^a] - a log T) / (a - 1)`` exactly (Feldman &
   Shenfeld, Cor. 6.2). The moments of the sum of T iid copies are computed exactly by binomial convolution
   (doubling over T) in log space; every term is positive, so there is no cancellation, and a relative
   safety margin of 1e-9 covers floating-point rounding. Summed over epochs and converted to (eps, delta)
   with dp-accounting's ``compute_epsilon`` (Balle et al. 2020, Prop. 12 / Canonne, Kamath & Steinke 2020).
4. **Add direction, Q against P: Jensen plus the exact Gaussian profile.** ``log Q/P(x) = -log((1/T) sum_i
   Y_i) <= -(1/T) sum_i log Y_i = 1/(2 sigma^2) - mean_i(x_i) / sigma^2`` (log is concave). Under Q the right
   side is ``G + c`` with ``G ~ N(mu^2/2, mu^2)``, ``mu^2 = 1/(T sigma^2)`` and ``c = (1 - 1/T) / (2 sigma^2)``:
   the privacy loss of a Gaussian mechanism of parameter mu, shifted by c. The hockey-stick divergence
   ``E_Q[(1 - e^(eps - L))_+]`` grows with the loss L, so ``delta_add(eps) <= delta_Gauss(mu, eps - c)``; over
   epochs the Gaussians add: ``mu^2 = sum E / (T sigma^2)``, ``c = sum E (1 - 1/T) / (2 sigma^2)``, and
   ``eps_add = c + gaussian_epsilon(mu, delta)`` (Balle & Wang 2018, exact Gaussian profile).
5. **Add direction, tighter: a pessimistic lattice PLD.** Round every ``Y_i`` DOWN to the lattice ``h N``
   and cap it at ``M`` (``Y'_i = min(h floor(Y_i / h), M) <= Y_i``), so ``S' = sum_i Y'_i <= sum_i Y_i`` and
   the loss ``L' = log(T / S') >= L`` for the same x: by the monotonicity of step 4, the privacy profile of L'
   bounds that of L. ``Y'`` has an exact lattice PMF (normal CDF differences of ``log Y ~ N(-1/(2 sigma^2),
   1/sigma^2)``); the PMF of ``S'`` is its T-fold convolution (direct sums of non-negative terms, no FFT);
   ``S' = 0`` is an infinite loss (infinity mass). Each loss is rounded UP to dp-accounting's grid and the
   per-epoch PMFs are composed with dp-accounting's pessimistic ``PLDPmf`` (``self_compose`` / ``compose``).
   ``eps_add`` is the smaller of this and step 4's value (both are upper bounds).
6. The published eps is ``max(eps_remove, eps_add)``: add-or-remove-one needs both directions.

Adjacency: **add-or-remove-one example** (as for Poisson sampling). Not covered: user-level runs (refused).

Example:
    >>> acc = RandomAllocationAccountant()
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)   # one epoch of T = 10 steps
    >>> 0 < acc.get_epsilon(delta=1e-5) < 10
    True
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

from ._validation import check_delta
from .base import Accountant
from .report import PrivacyReport, report_without_edgeworth
from .shuffled import gaussian_epsilon

ADJACENCY = "add-or-remove-one example"
SAMPLING = "random allocation (balls-in-bins)"
#: Integer Renyi orders used for the remove direction (any subset gives a valid bound; more orders, tighter).
ORDERS = tuple(range(2, 257))
#: Relative margin on the log-moments for floating-point rounding (all summed terms are positive).
LOG_MARGIN = 1e-9
#: Add-direction lattice PLD (step 5): lattice step h and cap M of Y, and dp-accounting's loss grid.
ADD_LATTICE = 0.01
ADD_CAP = 4.0
ADD_LOSS_GRID = 1e-4


def _steps_per_epoch(sample_rate: float) -> int:
    """``T = max(1, round(1/q))``: the sampler's steps per epoch (same rule as :func:`hf_ewtune.sampling.steps_per_epoch_for`)."""
    return max(1, int(round(1.0 / float(sample_rate))))


def _binomial_convolve(log_a: np.ndarray, log_b: np.ndarray, log_binom: np.ndarray) -> np.ndarray:
    """``log E[(A + B)^k]`` for independent A, B from their log-moments (``sum_j C(k, j) E[A^j] E[B^(k-j)]``)."""
    k = len(log_a)
    idx = np.arange(k)
    diff = idx[:, None] - idx[None, :]  # k - j
    terms = log_binom + log_a[None, :] + np.where(diff >= 0, log_b[np.clip(diff, 0, None)], -np.inf)
    return logsumexp(terms, axis=1)


@lru_cache(maxsize=128)
def log_sum_moments(noise_multiplier: float, steps_per_epoch: int, max_order: int) -> tuple[float, ...]:
    """``log E[(Y_1 + ... + Y_T)^k]`` for k = 0..max_order, Y_i iid with ``log E[Y^k] = k (k-1) / (2 sigma^2)``.

    Example:
        >>> m = log_sum_moments(1.0, 2, 2)   # E[(Y1+Y2)^2] = 2 E[Y^2] + 2 E[Y]^2 = 2e + 2
        >>> round(math.exp(m[2]), 6) == round(2 * math.e + 2, 6)
        True
    """
    k = np.arange(max_order + 1, dtype=float)
    one = k * (k - 1.0) / (2.0 * float(noise_multiplier) ** 2)
    log_binom = gammaln(k[:, None] + 1) - gammaln(k[None, :] + 1) - gammaln(np.maximum(k[:, None] - k[None, :], 0) + 1)
    log_binom = np.where(k[None, :] <= k[:, None], log_binom, -np.inf)
    result: np.ndarray | None = None
    power = one
    t = int(steps_per_epoch)
    while t:
        if t & 1:
            result = power if result is None else _binomial_convolve(result, power, log_binom)
        t >>= 1
        if t:
            power = _binomial_convolve(power, power, log_binom)
    assert result is not None
    return tuple(float(v) for v in result)


@lru_cache(maxsize=128)
def remove_rdp(noise_multiplier: float, steps_per_epoch: int) -> tuple[float, ...]:
    """Upper bounds on ``D_a(P||Q)`` of one epoch at the orders :data:`ORDERS` (step 3 of the module docstring).

    Example:
        >>> abs(remove_rdp(2.0, 1)[0] - 2 / (2 * 2.0 ** 2)) < 1e-6   # T = 1: the Gaussian, a / (2 sigma^2)
        True
    """
    t = int(steps_per_epoch)
    logs = log_sum_moments(float(noise_multiplier), t, max(ORDERS))
    out = []
    for a in ORDERS:
        log_m = logs[a]
        log_m += LOG_MARGIN * (1.0 + abs(log_m))
        out.append(max((log_m - a * math.log(t)) / (a - 1), 0.0))
    return tuple(out)


def epochs_touched(history: tuple) -> list[int]:
    """Per segment, the epochs (allocations) it may touch: ``ceil(steps / T)``, plus one after the first."""
    return [-(-int(n) // _steps_per_epoch(q)) + (1 if i else 0) for i, (_, q, n) in enumerate(history)]


def remove_epsilon(history: tuple, delta: float) -> float:
    """eps of the remove direction: summed Renyi bounds, converted by dp-accounting (step 3)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    total = np.zeros(len(ORDERS))
    for (sigma, q, _), epochs in zip(history, epochs_touched(history)):
        total += epochs * np.asarray(remove_rdp(float(sigma), _steps_per_epoch(q)))
    eps, _ = compute_epsilon(list(ORDERS), list(total), delta)
    return float(eps)


def add_parameters(history: tuple) -> tuple[float, float]:
    """``(mu, c)`` of the add direction: Gaussian parameter and shift (step 4)."""
    mu2 = 0.0
    shift = 0.0
    for (sigma, q, _), epochs in zip(history, epochs_touched(history)):
        t = _steps_per_epoch(q)
        mu2 += epochs / (t * sigma * sigma)
        shift += epochs * (1.0 - 1.0 / t) / (2.0 * sigma * sigma)
    return math.sqrt(mu2), shift


def jensen_add_epsilon(history: tuple, delta: float) -> float:
    """eps of the add direction by Jensen: ``c + gaussian_epsilon(mu, delta)`` (step 4)."""
    mu, shift = add_parameters(history)
    return shift + gaussian_epsilon(mu, delta)


@lru_cache(maxsize=64)
def _lattice_sum_pmf(noise_multiplier: float, steps_per_epoch: int) -> np.ndarray:
    """PMF of ``S' = sum of T iid Y'`` on the lattice ``h N`` (step 5)."""
    from scipy.stats import norm

    h, k_max = ADD_LATTICE, int(round(ADD_CAP / ADD_LATTICE))
    mean, sd = -0.5 / noise_multiplier**2, 1.0 / noise_multiplier
    z = (np.log(h * np.arange(1, k_max + 1)) - mean) / sd  # P(Y < k h) = Phi(z_k), k = 1..k_max
    cdf, sf = norm.cdf(z), norm.sf(z)
    one = np.empty(k_max + 1)
    one[0] = cdf[0]
    one[1:k_max] = np.where(z[1:] <= 0.0, cdf[1:] - cdf[:-1], sf[:-1] - sf[1:])  # the accurate side of Phi
    one[k_max] = sf[-1]
    one = np.clip(one, 0.0, None)
    result, power, t = None, one, int(steps_per_epoch)
    while t:
        if t & 1:
            result = power if result is None else np.convolve(result, power)
        t >>= 1
        if t:
            power = np.convolve(power, power)
    return result


def _add_epoch_pmf(noise_multiplier: float, steps_per_epoch: int):
    """dp-accounting ``PLDPmf`` of one epoch's add-direction loss ``L' = log(T / S')``, rounded up (step 5)."""
    from dp_accounting.pld import pld_pmf

    pmf = _lattice_sum_pmf(float(noise_multiplier), int(steps_per_epoch))
    k = np.arange(1, len(pmf))
    loss = math.log(steps_per_epoch) - np.log(k * ADD_LATTICE)
    idx = np.ceil(loss / ADD_LOSS_GRID).astype(np.int64)  # rounded UP: pessimistic
    lower = int(idx.min())
    probs = np.bincount(idx - lower, weights=pmf[1:])
    return pld_pmf.DensePLDPmf(ADD_LOSS_GRID, lower, probs, float(pmf[0]), True)


def lattice_add_epsilon(history: tuple, delta: float) -> float:
    """eps of the add direction from the composed lattice PLDs (step 5)."""
    total = None
    for (sigma, q, _), epochs in zip(history, epochs_touched(history)):
        pmf = _add_epoch_pmf(sigma, _steps_per_epoch(q))
        pmf = pmf.self_compose(epochs) if epochs > 1 else pmf
        total = pmf if total is None else total.compose(pmf)
    return max(float(total.get_epsilon_for_delta(delta)), 0.0)


def add_epsilon(history: tuple, delta: float) -> float:
    """eps of the add direction: the smaller of the Jensen (step 4) and lattice PLD (step 5) bounds."""
    return min(jensen_add_epsilon(history, delta), lattice_add_epsilon(history, delta))


def random_allocation_epsilon(history: tuple, delta: float) -> float:
    """Certified eps for random allocation: ``max(remove, add)`` (see the module docstring).

    Example:
        >>> h = ((1.0, 1.0, 3),)   # T = 1: every example in every step, the plain Gaussian (mu = sqrt(3))
        >>> jensen_add_epsilon(h, 1e-5) == gaussian_epsilon(math.sqrt(3), 1e-5)
        True
    """
    delta = check_delta(delta)
    history = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    remove = remove_epsilon(history, delta)
    jensen = jensen_add_epsilon(history, delta)
    if jensen <= remove:  # max(remove, min(jensen, lattice)) is then `remove`: skip the lattice PLD
        return remove
    return max(remove, min(jensen, lattice_add_epsilon(history, delta)))


class RandomAllocationAccountant(Accountant):
    """Certified accountant for random allocation (balls-in-bins) sampling (see the module docstring).

    The steps per epoch of each segment are ``round(1/q)`` of its sample rate, as the sampler uses them.
    """

    name = "random_allocation"
    certifier_label = "random-allocation bound"
    #: the sampling this accountant certifies (named in logs)
    sampling = SAMPLING

    # ---- runs: a restart may begin mid-epoch, so its steps are kept in a segment of their own
    def start_run(self) -> None:
        """Mark the start of a training run (or resume): the next steps open a new segment."""
        self._merge_next = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._merge_next = False

    def _load_segment(self, sigma: float, q: float, n: int) -> None:
        self._merge_next = False
        self.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)

    @property
    def certified_by(self) -> str:
        from .certified import dp_accounting_version

        return (
            "hf_ewtune random-allocation bound (Feldman & Shenfeld 2025; dominating pair of Chua et al. 2025): "
            "remove direction by the exact integer-order Renyi divergence composed over epochs and converted by "
            f"dp-accounting {dp_accounting_version()}; add direction by a pessimistic lattice PLD composed with "
            f"dp-accounting's PLD (or Jensen + the Gaussian profile, if smaller); {ADJACENCY}, one participation per "
            "example per epoch of round(1/q) steps"
        )

    def _certified_epsilon(self, history, delta):
        return random_allocation_epsilon(history, delta)

    def get_privacy_spent(self, delta: float = 1e-5) -> PrivacyReport:
        """The certified epsilon; no Edgeworth estimate (it models Poisson sampling, not random allocation)."""
        return report_without_edgeworth(
            self, delta, run_was="used random allocation", adjacency=ADJACENCY, sampling=SAMPLING)


__all__ = ["RandomAllocationAccountant", "add_epsilon", "jensen_add_epsilon", "lattice_add_epsilon",
           "random_allocation_epsilon", "remove_epsilon", "remove_rdp"]
