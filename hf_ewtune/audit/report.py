"""The audit report: certified epsilon (upper bound) next to the audited epsilon (lower bound).

For a correct implementation the lower bound stays below the certified epsilon (up to the stated
confidence). When it does not, :attr:`AuditReport.violation` is True and :meth:`AuditReport.summary_lines`
says so first, in capitals: a privacy bug was found.

Example:
    >>> r = AuditReport(kind="gradient", certified_epsilon=1.0, delta=1e-5, epsilon_lower=4.0, confidence=0.95,
    ...                 num_canaries=500, num_included=250, num_guesses=10, num_correct=10, steps=30,
    ...                 noise_multiplier=2.0, sample_rate=0.1, train_seconds=3.0, rules_tried=12)
    >>> r.violation, r.summary_lines()[0].startswith("PRIVACY VIOLATION")
    (True, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class AuditReport:
    """Result of one audited training run.

    Attributes:
        kind: ``"gradient"`` (white-box Dirac gradient canaries) or ``"input"`` (black-box mislabelled examples).
        certified_epsilon: The run's certified epsilon (upper bound) at ``delta``.
        delta: The certified delta (also the delta of the audited hypothesis).
        epsilon_lower: The one-run empirical lower bound at ``confidence``.
        confidence: The stated confidence of ``epsilon_lower``.
        num_canaries: m (each included with probability 1/2).
        num_included: Canaries that were in the training set.
        num_guesses: r, guesses of the best rule.
        num_correct: v, correct guesses of the best rule.
        steps: Optimizer steps taken.
        noise_multiplier: sigma of the run.
        sample_rate: Poisson rate q of the run.
        train_seconds: Wall time of the training.
        rules_tried: Guessing rules tried (the Bonferroni factor already paid in ``epsilon_lower``).
        command: The command line that produced it (``hf-ewtune audit``), if any.
        wall_seconds: Wall time of the whole audit (loading, training, scoring), if measured.
        num_processes: Processes of the run (``accelerate launch``); every one's scores are gathered.
        replicas_agree: False when the processes released different canary gradients (a multi-process bug:
            each replica was then audited, Bonferroni over them, and the largest bound is ``epsilon_lower``).
    """

    kind: str
    certified_epsilon: float
    delta: float
    epsilon_lower: float
    confidence: float
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    train_seconds: float
    rules_tried: int
    command: str | None = None
    wall_seconds: float | None = None
    num_processes: int = 1
    replicas_agree: bool = True

    @property
    def violation(self) -> bool:
        """True when the audited lower bound exceeds the certified epsilon: the guarantee is false (a bug)."""
        return self.epsilon_lower > self.certified_epsilon

    def summary_lines(self) -> list[str]:
        """Human-readable lines; the first says loudly when the certified epsilon is contradicted."""
        lines = []
        if self.violation:
            lines.append(
                f"PRIVACY VIOLATION: the audited lower bound {self.epsilon_lower:.3f} EXCEEDS the certified epsilon "
                f"{self.certified_epsilon:.3f} (at {self.confidence:.0%} confidence). The guarantee is false: "
                "clipping, noise, sampling or accounting is broken."
            )
        if not self.replicas_agree:
            lines.append(self.divergence_line())
        accuracy = self.num_correct / self.num_guesses if self.num_guesses else float("nan")
        lines += [
            f"certified epsilon (upper bound): {self.certified_epsilon:.3f} at delta = {self.delta:.1e}",
            f"audited epsilon (lower bound, {self.confidence:.0%} confidence): {self.epsilon_lower:.3f}",
            f"canaries: {self.num_canaries} {self.kind} canaries, {self.num_included} included; best rule: "
            f"{self.num_correct} of {self.num_guesses} guesses correct ({accuracy:.1%}), {self.rules_tried} rules tried",
            f"run: {self.steps} steps, sigma = {self.noise_multiplier:.4g}, q = {self.sample_rate:.4g}, "
            f"{self.train_seconds:.1f} s of training"
            + (f", {self.wall_seconds:.1f} s in all" if self.wall_seconds is not None else "")
            + (f", {self.num_processes} processes" if self.num_processes > 1 else ""),
        ]
        if not self.violation:
            lines.append("no violation found (a one-run lower bound is usually far below the certified epsilon; "
                         "see docs/audit.md)")
        if self.command:
            lines.append(f"command: {self.command}")
        return lines

    def divergence_line(self) -> str:
        """The warning for replicas that released different gradients."""
        return (f"REPLICAS DIVERGED: the {self.num_processes} processes released different canary gradients (DP-DDP "
                "must give every rank the same noisy gradient; the noise or the all-reduce did not reach every rank). Every "
                "replica was audited; the bound is the largest (Bonferroni over the processes).")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with ``violation``); an infinite certified epsilon becomes ``"inf"``."""
        d = asdict(self)
        d["violation"] = self.violation
        if not math.isfinite(d["certified_epsilon"]):
            d["certified_epsilon"] = "inf"
        return d

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
