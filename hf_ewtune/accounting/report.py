"""The privacy report returned by every accountant's ``get_privacy_spent``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_ewtune.json_safe import json_safe

_json_safe = json_safe  # the package's one JSON-safe conversion (kept under its old name for importers)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


@dataclass
class PrivacyReport:
    """What an accountant certifies after the steps it has seen.

    Attributes:
        epsilon: the CERTIFIED epsilon at ``delta`` (an upper bound; ``inf`` if any step had no noise).
        delta: the delta it was computed at.
        certified_by: what certified ``epsilon`` (library, version, method and options).
        accountant: the accountant's registry name ("edgeworth", "pld" or "rdp").
        edgeworth_epsilon: Edgeworth order-1 point estimate (EW-Tune's number): an estimate, not a guarantee.
        edgeworth_epsilon_order2: Edgeworth order-2 point estimate (estimate, not a guarantee).
        edgeworth_error_bound: the explicit uniform error bound of the order-1 expansion, with keys
            ``delta_x``, ``delta_y``, ``epsilon_lower``, ``epsilon_upper``, ``certified`` (bool), ``reason``.
        steps: total number of steps accounted.
        history: segments ``(noise_multiplier, sample_rate, num_steps)``.
        noise_multiplier: noise multiplier of the last segment (None before any step).
        sample_rate: sampling rate of the last segment (None before any step).

    ``to_dict()`` is JSON-safe: infinite values become the string ``"inf"`` (``float("inf")`` parses it
    back), and values that were not computed are ``None``.

    Example:
        >>> from hf_ewtune.accounting import PLDAccountant
        >>> acc = PLDAccountant()
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
        >>> report = acc.get_privacy_spent(delta=1e-5)
        >>> report.epsilon > 0 and "PLD" in report.certified_by
        True
    """

    epsilon: float
    delta: float
    certified_by: str
    accountant: str
    edgeworth_epsilon: float | None = None
    edgeworth_epsilon_order2: float | None = None
    edgeworth_error_bound: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    adjacency: str = "add-or-remove-one example"
    sampling: str = "Poisson sampling"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``inf`` -> ``"inf"``; tuples -> lists)."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyReport":
        """Inverse of :meth:`to_dict` (the strings ``"inf"``/``"-inf"``/``"nan"`` become floats)."""

        def back(v: Any) -> Any:
            if v in ("inf", "-inf", "nan"):
                return float(v)
            if isinstance(v, dict):
                return {k: back(x) for k, x in v.items()}
            if isinstance(v, list):
                return [back(x) for x in v]
            return v

        data = {k: back(v) for k, v in data.items()}
        data["history"] = [tuple(h) for h in data.get("history", [])]
        return cls(**data)

    def __str__(self) -> str:
        bound = self.edgeworth_error_bound or {}
        lines = [
            f"Certified privacy: epsilon = {_fmt(self.epsilon)} at delta = {self.delta:g}",
            f"  certified by: {self.certified_by}",
            f"  ({self.adjacency}, assuming {self.sampling}; {self.steps} steps, "
            f"noise multiplier {_fmt(self.noise_multiplier)}, sample rate {_fmt(self.sample_rate, 6)})",
            f"Edgeworth estimate (not a guarantee): epsilon ~ {_fmt(self.edgeworth_epsilon)} (order 1), "
            f"{_fmt(self.edgeworth_epsilon_order2)} (order 2)",
        ]
        if bound:
            if bound.get("delta_x") is None:
                lines.append(f"Edgeworth error bound: {bound.get('reason') or 'not available'}")
            else:
                lines.append(
                    f"Edgeworth error bound (order 1): Delta_X = {bound['delta_x']:.4g}, "
                    f"Delta_Y = {bound['delta_y']:.4g}, epsilon in [{_fmt(bound.get('epsilon_lower'))}, "
                    f"{_fmt(bound.get('epsilon_upper'))}]; {bound.get('reason', '')}"
                )
        return "\n".join(lines)


def report_without_edgeworth(
    accountant: Any, delta: float, *, run_was: str, adjacency: str, sampling: str
) -> PrivacyReport:
    """The report of an accountant for a sampling the Edgeworth expansion does not model (certified epsilon only).

    Args:
        accountant: The accountant (``get_epsilon``, ``certified_by``, ``name``, ``steps`` and its ``_history``).
        delta: The delta to report at.
        run_was: How the run sampled, completing "this run ..." in the not-applicable reason.
        adjacency: The adjacency the certified epsilon is for.
        sampling: The sampling's name.
    """
    epsilon = accountant.get_epsilon(delta)
    history = tuple(accountant._history)
    last = history[-1] if history else (None, None, 0)
    return PrivacyReport(
        epsilon=epsilon,
        delta=delta,
        certified_by=accountant.certified_by,
        accountant=accountant.name,
        edgeworth_error_bound={
            "delta_x": None, "delta_y": None, "epsilon_lower": None, "epsilon_upper": None, "certified": False,
            "reason": f"not applicable: the Edgeworth expansion models Poisson sampling, this run {run_was}",
        },
        steps=accountant.steps,
        history=list(history),
        noise_multiplier=last[0],
        sample_rate=last[1],
        adjacency=adjacency,
        sampling=sampling,
    )
