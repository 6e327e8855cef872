"""Side-by-side comparison of the accountants (used by ``hf-ewtune compare``/``plot`` and the benchmark)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps
from .certified import pld_description, pld_epsilon, rdp_description, rdp_epsilon
from .cumulants import step_cumulants
from .edgeworth import epsilon_estimate, sum_cumulants
from .edgeworth_report import edgeworth_error_bound
from .saddle_point import clear_caches, spa_epsilon
from .saddle_point_bound import spa_bound

#: EW-Tune's SST-2 setting (B = 2000, N = 67349, 20 epochs) and the noise multiplier its Edgeworth
#: accountant picked for epsilon = 8.
SST2_SETTING = {"noise_multiplier": 0.7865, "sample_rate": 0.029696, "steps": 660, "delta": 1e-5}


@dataclass
class ComparisonRow:
    """One accountant's answer. ``kind`` is "certified", "estimate" or "bound"."""

    method: str
    kind: str
    epsilon: float
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        from .report import _json_safe

        return _json_safe(dict(method=self.method, kind=self.kind, epsilon=self.epsilon, seconds=self.seconds, note=self.note))


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare_accountants(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float = 1e-5, cold: bool = True
) -> list[ComparisonRow]:
    """Epsilon from every accountant for ``steps`` identical steps, with the time each took.

    Args:
        noise_multiplier, sample_rate, steps, delta: the setting.
        cold: clear the Edgeworth cumulant cache first, so its time includes the quadrature.

    Example:
        >>> rows = compare_accountants(**SST2_SETTING)
        >>> [r.method for r in rows][:2]
        ['Edgeworth order 1 (EW-Tune)', 'Edgeworth order 1 error bound']
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, allow_zero=False)
    delta = check_delta(delta)
    if sigma == 0.0:
        raise ValueError("noise_multiplier must be > 0 to compare accountants")
    history = [(sigma, q, steps)]
    if cold:
        step_cumulants.cache_clear()
    ew1, t1 = _timed(lambda: epsilon_estimate(delta, sum_cumulants(history), order=1))
    bound, tb = _timed(lambda: edgeworth_error_bound(tuple(history), delta))
    ew2, t2 = _timed(lambda: epsilon_estimate(delta, sum_cumulants(history), order=2))
    pld, tp = _timed(lambda: pld_epsilon(history, delta))
    pld3, tp3 = _timed(lambda: pld_epsilon(history, delta, value_discretization_interval=1e-3))
    rdp, tr = _timed(lambda: rdp_epsilon(history, delta))
    spa_rows = saddle_point_rows(history, delta, cold=cold)
    lo, up = bound["epsilon_lower"], bound["epsilon_upper"]
    return [
        ComparisonRow("Edgeworth order 1 (EW-Tune)", "estimate", ew1, t1, "estimate, not a guarantee"),
        ComparisonRow(
            "Edgeworth order 1 error bound",
            "bound",
            up,
            tb,
            f"interval [{lo:.4g}, {up:.4g}], Delta_X={bound['delta_x']:.3g}, Delta_Y={bound['delta_y']:.3g}: "
            + ("certified" if bound["certified"] else "not certifiable (Delta_Y >= delta)"),
        ),
        ComparisonRow("Edgeworth order 2", "estimate", ew2, t2, "estimate, not a guarantee"),
        ComparisonRow("PLD (default)", "certified", pld, tp, pld_description(1e-4)),
        ComparisonRow("PLD coarse (search)", "certified", pld3, tp3, pld_description(1e-3)),
        ComparisonRow("RDP", "certified", rdp, tr, rdp_description()),
        *spa_rows,
    ]


def saddle_point_rows(history, delta: float, *, cold: bool = True) -> list[ComparisonRow]:
    """Rows for the saddle-point accountant: SPA-CLT and SPA-MSD estimates and the certified upper bound.

    With ``cold`` every row's time starts from empty caches (no tilted moment reused).
    """

    def timed(fn):
        if cold:
            clear_caches()
        return _timed(fn)

    clt, tc = timed(lambda: spa_epsilon(history, delta, method="clt"))
    msd, tm = timed(lambda: spa_epsilon(history, delta, method="msd"))
    bound, tb = timed(lambda: spa_bound(history, delta))
    worst = max(bound.directions.values(), key=lambda d: d["epsilon"], default=None)
    detail = "" if worst is None else f", tilt {worst['tilt']:.3g}, Kolmogorov bound {worst['beta']:.3g}"
    return [
        ComparisonRow("Saddle-point SPA-CLT", "estimate", clt, tc, "estimate, not a guarantee"),
        ComparisonRow("Saddle-point SPA-MSD", "estimate", msd, tm, "estimate, not a guarantee"),
        ComparisonRow(
            "Saddle-point bound",
            "certified" if math.isfinite(bound.epsilon) else "bound",
            bound.epsilon,
            tb,
            "tilted Berry-Esseen upper bound (quadrature errors estimated, 10x margin)" + detail
            if math.isfinite(bound.epsilon)
            else "not certifiable here (vacuous bound)",
        ),
    ]


def _f(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4f}"


def format_comparison(rows: Sequence[ComparisonRow], *, setting: dict[str, Any] | None = None) -> str:
    """Plain-text (Markdown) table of :func:`compare_accountants` rows, with the ratio to PLD."""
    pld = next((r.epsilon for r in rows if r.method.startswith("PLD (default)")), None)
    lines = []
    if setting:
        lines.append(
            "Setting: noise multiplier {noise_multiplier:g}, sample rate {sample_rate:g}, {steps} steps, "
            "delta {delta:g} (Poisson sampling, add-or-remove-one)".format(**setting)
        )
        lines.append("")
    lines.append("| accountant | kind | epsilon | eps / PLD | time (s) | note |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if not pld or math.isinf(r.epsilon) else f"{r.epsilon / pld:.3f}"
        lines.append(f"| {r.method} | {r.kind} | {_f(r.epsilon)} | {ratio} | {r.seconds:.4f} | {r.note} |")
    certified = [r for r in rows if r.kind == "certified" or (r.kind == "bound" and "not" not in r.note)]
    if pld is not None:
        best = min(certified, key=lambda r: r.epsilon)
        lines.append("")
        lines.append(
            f"Published (certified) epsilon: {_f(best.epsilon)} ({best.method}); the Edgeworth numbers are estimates."
        )
    return "\n".join(lines)


def epsilon_curves(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float = 1e-5, points: int = 12
) -> dict[str, Any]:
    """Epsilon vs number of steps for each accountant (PLD at value discretization 1e-3 for speed:
    pessimistic, hence still a certified upper bound).

    Returns a dict with ``steps`` (list of ints) and one list of epsilons per accountant.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, allow_zero=False)
    delta = check_delta(delta)
    grid = sorted({int(round(x)) for x in np.linspace(max(1, steps / points), steps, points)})
    curves: dict[str, Any] = {"steps": grid}
    curves["Edgeworth order 1 (estimate)"] = [
        epsilon_estimate(delta, sum_cumulants([(sigma, q, n)]), order=1) for n in grid
    ]
    curves["Edgeworth order 2 (estimate)"] = [
        epsilon_estimate(delta, sum_cumulants([(sigma, q, n)]), order=2) for n in grid
    ]
    curves["PLD (certified)"] = [
        pld_epsilon([(sigma, q, n)], delta, value_discretization_interval=1e-3) for n in grid
    ]
    curves["RDP (certified)"] = [rdp_epsilon([(sigma, q, n)], delta) for n in grid]
    return curves
