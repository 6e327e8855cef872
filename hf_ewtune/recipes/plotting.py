"""Privacy curve plot: certified epsilon and the Edgeworth estimate against optimizer steps.

Example:
    >>> from hf_ewtune.recipes.plotting import privacy_curve_points
    >>> privacy_curve_points([{"step": 5, "epsilon": 1.0, "epsilon_edgeworth": 0.9}, {"step": 6, "loss": 0.3}])
    ([5], [1.0], [0.9])
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)


def privacy_curve_points(log_history: Sequence[dict[str, Any]]) -> tuple[list[int], list[float], list[float | None]]:
    """Extract ``(steps, certified epsilons, Edgeworth estimates)`` from a Trainer's ``log_history``.

    Only log entries carrying ``"epsilon"`` count; a step logged twice keeps its last entry.
    """
    by_step: dict[int, tuple[float, float | None]] = {}
    for entry in log_history:
        if "epsilon" not in entry or entry.get("epsilon") is None:
            continue
        ew = entry.get("epsilon_edgeworth")
        by_step[int(entry.get("step", 0))] = (float(entry["epsilon"]), None if ew is None else float(ew))
    steps = sorted(by_step)
    return steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps]


def plot_privacy_curve(
    *,
    log_history: Sequence[dict[str, Any]],
    path: str | Path,
    target_epsilon: float | None = None,
    certified_by: str | None = None,
    delta: float | None = None,
    final: tuple[int, float, float | None] | None = None,
) -> Path | None:
    """Write a PNG of certified epsilon (and the Edgeworth estimate) against optimizer steps.

    Args:
        log_history: ``trainer.state.log_history``.
        path: Where to write the PNG.
        target_epsilon: Drawn as a horizontal line when given.
        certified_by: Accountant name for the legend (e.g. ``"PLD (dp-accounting 0.6.0)"``).
        delta: Shown in the title.
        final: ``(step, certified epsilon, Edgeworth estimate)`` of the finished run, appended when the
            logs stop earlier.

    Returns:
        The path written, or ``None`` when matplotlib is missing or nothing was logged (a note is logged).
    """
    steps, eps, ew = privacy_curve_points(log_history)
    if final is not None and (not steps or final[0] > steps[-1]):
        steps.append(int(final[0]))
        eps.append(float(final[1]))
        ew.append(None if final[2] is None else float(final[2]))
    if not steps:
        logger.warning("No epsilon in the training logs: privacy-curve plot skipped.")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hf_ewtune[plot]'): privacy-curve plot skipped.")
        return None
    steps = [0, *steps]
    eps = [0.0, *eps]
    ew = [0.0, *ew]
    fig, ax = plt.subplots(figsize=(6, 4))
    short = (certified_by or "certified accountant").split(" (")[0]
    ax.plot(steps, eps, marker="o", ms=3, label=f"certified ε ({short})")
    ew_pts = [(s, e) for s, e in zip(steps, ew) if e is not None and math.isfinite(e)]
    if len(ew_pts) > 1:
        ax.plot(*zip(*ew_pts), ls="--", label="Edgeworth ε — estimate (not a guarantee)")
    if target_epsilon is not None:
        ax.axhline(target_epsilon, color="grey", lw=0.8, ls=":", label=f"target ε = {target_epsilon:g}")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("ε")
    ax.set_title("Privacy spent" + (f" (δ = {delta:.2g})" if delta else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
