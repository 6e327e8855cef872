"""Noise calibration (certified) and step budgets.

R5 of the design: the Edgeworth estimate gives a fast first guess ``sigma_EW``; the returned noise
multiplier is then the smallest sigma (to 0.5%) whose CERTIFIED epsilon is <= the target. The search
uses PLD with a coarse value discretization (1e-3: pessimistic, so still an upper bound, only looser)
and the result is checked with the accountant's own certified epsilon (PLD 1e-4 by default).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

from hf_ewtune.errors import BudgetExhaustedError, PrivacyConfigError

from ._validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps, check_target_epsilon
from .base import Accountant
from .certified import COARSE_VDI  # noqa: F401 - re-exported (defined here before)
from .edgeworth import epsilon_estimate, sum_cumulants
from .registry import make_accountant

SEARCH_RTOL = 0.0025  # coarse bisection tolerance: half of the promised 0.5%
SIGMA_MIN = 1e-2
SIGMA_MAX = 1e4


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
        noise_multiplier: the calibrated sigma.
        epsilon: CERTIFIED epsilon at ``noise_multiplier`` (with ``certify=False`` it may exceed the target).
        sigma_edgeworth: sigma that the Edgeworth order-1 estimate alone would pick (EW-Tune).
        certified: True when ``epsilon <= target_epsilon`` was checked with the certified accountant.
        accountant: accountant name used for the certified check.
        seconds: wall time of the calibration.
    """

    noise_multiplier: float
    epsilon: float
    sigma_edgeworth: float
    certified: bool
    accountant: str
    seconds: float
    target_epsilon: float | None = None
    delta: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    certified_by: str = ""
    edgeworth_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``inf`` -> ``"inf"``)."""
        from .report import _json_safe

        return _json_safe(asdict(self))


def _smallest_sigma(fn: Callable[[float], float], target: float, lo: float, hi: float, rtol: float) -> tuple[float, float]:
    """Bracket and bisect (geometrically) the smallest sigma with ``fn(sigma) <= target``.

    Returns ``(lo, hi)`` with ``fn(hi) <= target < fn(lo)`` and ``hi / lo <= 1 + rtol`` (or ``lo == hi``
    when the target is met even at ``SIGMA_MIN``).
    """
    while fn(hi) > target:
        lo, hi = hi, hi * 1.3
        if hi > SIGMA_MAX:
            raise PrivacyConfigError(
                f"target_epsilon={target!r} cannot be reached with noise_multiplier <= {SIGMA_MAX:g}; "
                "raise target_epsilon or lower sample_rate / steps."
            )
    while fn(lo) <= target:
        hi, lo = lo, lo / 1.3
        if lo < SIGMA_MIN:
            return hi, hi
    # Bracketing secant in log-log coordinates (epsilon(sigma) is smooth and decreasing), with a pair of
    # probes around the interpolated crossing so that one round usually closes the bracket; falls back
    # to geometric bisection whenever interpolation is not possible or does not shrink the bracket.
    bisect_next = False
    while hi / lo > 1.0 + rtol:
        f_lo, f_hi = fn(lo), fn(hi)
        width = math.log(hi / lo)
        if not bisect_next and math.isfinite(f_lo) and f_hi > 0 and f_lo > f_hi:
            w = (math.log(f_lo) - math.log(target)) / (math.log(f_lo) - math.log(f_hi))
            guess = lo * math.exp(w * width)
        else:
            guess = math.sqrt(lo * hi)
        probe = min(max(guess * (1.0 + 0.4 * rtol), lo * (1.0 + 0.1 * rtol)), hi / (1.0 + 0.1 * rtol))
        if fn(probe) <= target:
            hi = probe
            probe2 = max(probe / (1.0 + 0.9 * rtol), lo * (1.0 + 0.05 * rtol))
            if fn(probe2) <= target:
                hi = probe2
            else:
                lo = probe2
        else:
            lo = probe
        bisect_next = math.log(hi / lo) > 0.5 * width
    return lo, hi


def _memo(fn: Callable[[float], float]) -> Callable[[float], float]:
    cache: dict[float, float] = {}

    def wrapped(x: float) -> float:
        if x not in cache:
            cache[x] = fn(x)
        return cache[x]

    wrapped.cache = cache  # type: ignore[attr-defined]
    return wrapped


def edgeworth_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, order: int = 1) -> float:
    """Smallest sigma (to 1e-4 relative) whose Edgeworth estimate is <= target (EW-Tune; NOT certified)."""

    def ew(sigma: float) -> float:
        return epsilon_estimate(delta, sum_cumulants([(sigma, sample_rate, steps)]), order=order)

    _, hi = _smallest_sigma(_memo(ew), target_epsilon, 0.5, 1.0, 1e-4)
    return hi


def _validate(target_epsilon, delta, sample_rate, steps) -> tuple[float, float, float, int]:
    return (
        check_target_epsilon(target_epsilon),
        check_delta(delta),
        check_sample_rate(sample_rate),
        check_steps(steps, allow_zero=False),
    )


def _fresh(accountant: str | Accountant) -> Accountant:
    """A new accountant without history: by name, or with the class and options of ``accountant``."""
    if isinstance(accountant, Accountant):
        return make_accountant(accountant.name, **accountant.options())
    return make_accountant(accountant)


def calibrate(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | Accountant = "edgeworth",
    certify: bool = True,
) -> CalibrationResult:
    """Smallest noise multiplier (within 0.5%) whose certified epsilon is <= ``target_epsilon``.

    Args:
        target_epsilon: privacy budget epsilon (> 0).
        delta: target delta in (0, 1).
        sample_rate: Poisson sampling rate q in (0, 1].
        steps: number of DP-SGD steps (>= 1).
        accountant: ``"edgeworth"`` (default: Edgeworth first guess, certified by PLD), ``"pld"`` or ``"rdp"``.
        certify: if False (Edgeworth only) return EW-Tune's sigma from the order-1 estimate alone; this
            emits a warning because the result is an estimate, not a guarantee. The certified epsilon at
            that sigma is still computed and reported in ``epsilon``.

    Example:
        >>> r = calibrate(target_epsilon=3, delta=1e-5, sample_rate=0.01, steps=300)
        >>> r.certified and r.epsilon <= 3 and round(r.noise_multiplier, 2)
        0.71
    """
    started = time.perf_counter()
    target, delta, q, steps = _validate(target_epsilon, delta, sample_rate, steps)
    acc = _fresh(accountant)
    template = acc

    labels: dict[float, str] = {}

    def certified_eps(sigma: float) -> float:
        a = template.copy()
        a.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        eps = a.get_epsilon(delta)
        labels[sigma] = a._certified_by_for(tuple(a.history), delta)  # names a coarser grid / RDP fallback
        return eps

    sigma_ew = edgeworth_sigma(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    ew_at = lambda s: epsilon_estimate(delta, sum_cumulants([(s, q, steps)]), order=1)  # noqa: E731

    def result(sigma: float, eps: float) -> CalibrationResult:
        return CalibrationResult(
            noise_multiplier=sigma,
            epsilon=eps,
            sigma_edgeworth=sigma_ew,
            certified=eps <= target,
            accountant=acc.name,
            seconds=time.perf_counter() - started,
            target_epsilon=target,
            delta=delta,
            sample_rate=q,
            steps=steps,
            certified_by=labels.get(sigma, template.certified_by),
            edgeworth_epsilon=ew_at(sigma),
        )

    if not certify and acc.edgeworth_based:
        warnings.warn(
            "calibrate(certify=False) returns EW-Tune's noise multiplier from the Edgeworth ESTIMATE; "
            "it is not a privacy guarantee (the certified epsilon at this sigma is in result.epsilon).",
            UserWarning,
            stacklevel=2,
        )
        return result(sigma_ew, certified_eps(sigma_ew))

    fine = _memo(certified_eps)
    search = template.search_epsilon_fn()
    if search is not None:
        coarse = _memo(lambda s: search(((s, q, steps),), delta))
    else:
        coarse = fine
    start = max(sigma_ew, SIGMA_MIN)  # the accountants support sigma >= SIGMA_MIN (see _validation)
    lo, hi = _smallest_sigma(coarse, target, start, 1.3 * start, SEARCH_RTOL)
    if coarse is not fine:
        # Certify with the accountant's own (finer) epsilon; step up if the coarse search was too optimistic.
        while fine(hi) > target:
            lo, hi = hi, hi * (1.0 + SEARCH_RTOL)
        # Optimality: only re-check lo when the coarse margin there is within the coarse/fine gap.
        if lo < hi and lo in coarse.cache and lo not in fine.cache:  # type: ignore[attr-defined]
            gap = max(coarse(hi) - fine(hi), 0.0)
            if coarse(lo) - target <= 2.0 * gap + 1e-3 and fine(lo) <= target:
                lo, hi = _smallest_sigma(fine, target, lo / 1.01, lo, SEARCH_RTOL)
    return result(hi, fine(hi))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | Accountant = "edgeworth",
    certify: bool = True,
) -> float:
    """Noise multiplier from :func:`calibrate` (see there).

    Example:
        >>> sigma = calibrate_noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.029696, steps=660)
        >>> round(sigma, 2)
        0.8
    """
    return calibrate(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        certify=certify,
    ).noise_multiplier


def steps_within_budget(
    *,
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    delta: float,
    accountant: str | Accountant = "edgeworth",
    already: Accountant | None = None,
    max_steps: int | None = None,
) -> int:
    """Largest number of further steps whose CERTIFIED epsilon stays <= ``target_epsilon``.

    Args:
        noise_multiplier, sample_rate: parameters of the further steps.
        target_epsilon, delta: the budget.
        accountant: accountant name, or an accountant whose class and options (not its history) are used;
            ignored when ``already`` is given (then ``already``'s class, options and history are used).
        already: accountant holding the steps already taken (not modified).
        max_steps: cap on the answer (None: no cap).

    Raises:
        BudgetExhaustedError: if ``already`` has spent more than ``target_epsilon``.

    Example:
        >>> steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=2.0, delta=1e-5,
        ...                     accountant="rdp")
        881
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    target = check_target_epsilon(target_epsilon)
    delta = check_delta(delta)
    cap = None if max_steps is None else check_steps(max_steps, name="max_steps")
    base = already.copy() if already is not None else _fresh(accountant)
    spent = base.get_epsilon(delta)
    if spent > target:
        raise BudgetExhaustedError(
            f"target_epsilon={target:g} is already spent: the steps taken so far give a certified epsilon of "
            f"{spent:.4g} at delta={delta:g} ({base.certified_by})."
        )
    if sigma == 0.0 or cap == 0:
        return 0
    prefix = tuple(base.history)

    def fine_eps(n: int) -> float:
        a = base.copy()
        a.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        return a.get_epsilon(delta)

    fine = _memo(fine_eps)
    fine.cache[0] = spent  # type: ignore[attr-defined]
    hard_cap = cap if cap is not None else 10**9
    search = base.search_epsilon_fn()
    if search is not None:
        coarse = _memo(lambda n: search(prefix + ((sigma, q, n),), delta))
        coarse.cache[0] = spent  # type: ignore[attr-defined]
    else:
        coarse = fine
    guess = _edgeworth_steps_guess(prefix, sigma, q, target, delta, hard_cap)
    n_coarse = _largest_int_ok(coarse, target, guess, hard_cap)
    if coarse is fine:
        return n_coarse
    # Final answer with the accountant's own certified epsilon (PLD 1e-4), starting from the coarse one.
    return _largest_int_ok(fine, target, max(n_coarse, 0), hard_cap, first_step=1)


def _edgeworth_steps_guess(prefix, sigma: float, q: float, target: float, delta: float, cap: int) -> int:
    """Largest n whose Edgeworth estimate is <= target (a cheap starting point, not a bound)."""

    def ew(n: int) -> float:
        return epsilon_estimate(delta, sum_cumulants(list(prefix) + [(sigma, q, n)]), order=1)

    try:
        n = 1
        if ew(1) > target:
            return 1
        while n < cap and ew(min(2 * n, cap)) <= target:
            n = min(2 * n, cap)
        lo, hi = n, min(2 * n, cap)
        while hi - lo > max(1, lo // 200):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ew(mid) <= target else (lo, mid)
        return max(1, lo)
    except (ValueError, ArithmeticError, FloatingPointError):  # pragma: no cover - defensive
        return 1


def _largest_int_ok(
    fn: Callable[[int], float], target: float, guess: int, cap: int, first_step: int | None = None
) -> int:
    """Largest integer n in [0, cap] with ``fn(n) <= target``, for ``fn`` non-decreasing with ``fn(0) <= target``.

    Brackets around ``guess`` (secant extrapolation, falling back to doubling steps), then interpolates
    with a pair of probes around each interpolated crossing (falling back to bisection). A good guess
    costs only a handful of evaluations; the answer is exact for the given ``fn``.
    """

    def secant_jump(a: int, b: int) -> int | None:
        fa, fb = fn(a), fn(b)
        if not (math.isfinite(fa) and math.isfinite(fb)) or fa == fb:
            return None
        slope = (fb - fa) / (b - a)
        return int(1.05 * abs(target - fb) / abs(slope)) + 1 if slope > 0 else None

    g = min(max(int(guess), 0), cap)
    if fn(g) <= target:
        lo, hi, prev = g, None, None
        step = first_step or max(1, g // 4)
        while hi is None:
            if lo >= cap:
                return cap
            jump = secant_jump(prev, lo) if prev is not None else None
            if jump is None:
                jump, step = step, step * 2
            probe = min(lo + max(1, jump), cap)
            if fn(probe) <= target:
                prev, lo = lo, probe
            else:
                hi = probe
    else:
        hi, lo, prev = g, None, None
        step = first_step or max(1, g // 5)
        while lo is None:
            jump = secant_jump(prev, hi) if prev is not None else None
            if jump is None:
                jump, step = step, step * 2
            probe = max(hi - max(1, jump), 0)
            if fn(probe) <= target:
                lo = probe
            else:
                prev, hi = hi, probe
    bisect_next = False
    while hi - lo > 1:
        width = hi - lo
        f_lo, f_hi = fn(lo), fn(hi)
        if not bisect_next and math.isfinite(f_hi) and f_hi > f_lo:
            mid = lo + int((target - f_lo) / (f_hi - f_lo) * width)
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        d = max(1, min(int(0.0015 * mid), width // 4))
        if fn(mid) <= target:
            lo = mid
            if mid + d < hi:
                lo, hi = (mid + d, hi) if fn(mid + d) <= target else (lo, mid + d)
        else:
            hi = mid
            if mid - d > lo:
                lo, hi = (mid - d, hi) if fn(mid - d) <= target else (lo, mid - d)
        bisect_next = (hi - lo) > width // 2
    return lo
