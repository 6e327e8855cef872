"""Trainer construction and run summaries shared by the recipes (private and non-private).

Example:
    >>> from hf_ewtune.recipes.training import PrivacySettings
    >>> PrivacySettings(target_epsilon=3.0).private
    True
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hf_ewtune.accounting.registry import accountant_names
from hf_ewtune.checks import check_delta, check_max_grad_norm, check_noise_multiplier, check_target_epsilon

logger = logging.getLogger(__name__)


def check_target_delta(delta: float) -> float:
    """:func:`~hf_ewtune.checks.check_delta` under the name ``target_delta``."""
    return check_delta(delta, name="target_delta")


def _privacy_option(name: str, check: Callable[[Any], Any] | None = None, *, help: str | None = None,
                    choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Field metadata for the command line: the help of :class:`~hf_ewtune.PrivacyArguments` and its value check."""
    from hf_ewtune.arguments import PrivacyArguments
    from hf_ewtune.cli_options import checked

    cli: dict[str, Any] = {}
    if check is not None:
        cli["type"] = checked(check)
    if choices is not None:
        cli["choices"] = choices
    meta = PrivacyArguments.__dataclass_fields__[name].metadata
    return {"help": help or meta.get("help"), "cli": cli}


@dataclass
class PrivacySettings:
    """What the DP trainer is asked to do; ``private=False`` gives the plain-``Trainer`` baseline.

    Attributes:
        target_epsilon: Certified epsilon to calibrate the noise to (ignored when ``noise_multiplier`` is set).
        noise_multiplier: Fixed sigma instead of a target epsilon.
        target_delta: Delta; ``None`` lets the trainer choose (below 1/N).
        max_grad_norm: Per-example clipping norm C.
        accountant: Accountant used for calibration/estimates (``"edgeworth"`` by default; the published
            epsilon is always certified).
        private: ``False`` runs the non-private baseline with the same optimisation settings.
        allow_large_delta: Accept a ``target_delta`` at or above 1/N (see :mod:`hf_ewtune.large_delta`).
    """

    target_epsilon: float | None = field(default=3.0, metadata=_privacy_option("target_epsilon", check_target_epsilon))
    noise_multiplier: float | None = field(
        default=None, metadata=_privacy_option("noise_multiplier", check_noise_multiplier,
                                               help="fixed noise multiplier sigma instead of calibrating to --target-epsilon"))
    target_delta: float | None = field(default=None, metadata=_privacy_option("target_delta", check_target_delta))
    max_grad_norm: float = field(default=1.0, metadata=_privacy_option("max_grad_norm", check_max_grad_norm))
    accountant: str = field(default="edgeworth", metadata=_privacy_option("accountant", choices=accountant_names()))
    private: bool = field(default=True, metadata={
        "help": "baseline: plain transformers.Trainer with the same settings, no privacy",
        "cli": {"negate": "non-private"}})
    allow_large_delta: bool = field(default=False, metadata=_privacy_option(
        "allow_large_delta", help="accept a --target-delta at or above 1/N (it permits releasing whole training "
                                  "examples; the model card says so). Without it such a delta is refused before training"))


def privacy_headline(privacy: PrivacySettings) -> str:
    """What the run is asked to do, for the first line the CLI prints: a target epsilon only when one is enforced.

    With ``noise_multiplier`` set, ``target_epsilon`` is ignored (the trainer gets fixed noise and no budget), so
    no target is named.

    Example:
        >>> privacy_headline(PrivacySettings(target_epsilon=3.0))
        'DP (target ε = 3, certified)'
        >>> privacy_headline(PrivacySettings(target_epsilon=3.0, noise_multiplier=0.8))
        'DP (fixed noise multiplier σ = 0.8, no target ε: the certified ε spent is reported)'
    """
    if not privacy.private:
        return "non-private baseline"
    if privacy.noise_multiplier is not None:
        return (f"DP (fixed noise multiplier σ = {privacy.noise_multiplier:g}, no target ε: the certified ε spent "
                "is reported)")
    return f"DP (target ε = {privacy.target_epsilon:g}, certified)"


def enforced_target(privacy: PrivacySettings) -> float | None:
    """The target epsilon the trainer enforces: ``None`` for fixed noise (``target_epsilon`` is then ignored)."""
    return privacy.target_epsilon if privacy.private and privacy.noise_multiplier is None else None


@dataclass
class RunResult:
    """Outcome of a recipe run (also written to ``output_dir/results.json``)."""

    output_dir: str
    metrics: dict[str, float]
    wall_seconds: float
    train_seconds: float
    steps: int
    private: bool
    epsilon: float | None = None
    certified_by: str | None = None
    edgeworth_epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    report: str | None = None
    plot_path: str | None = None
    card_path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True  # False on the other ranks of a multi-process run (they write no files)
    hub_commit: str | None = None  # URL of the upload, when the run was published

    def summary_lines(self) -> list[str]:
        """Human-readable lines: metrics, certified epsilon (and by what), Edgeworth estimate."""
        lines = [f"{k}: {v:.4f}" for k, v in self.metrics.items()]
        if self.private:
            delta = f", δ = {self.delta:.3g}" if self.delta else ""
            lines.append(f"certified ε = {self.epsilon:.3f}{delta} (certified by {self.certified_by})")
            if self.edgeworth_epsilon is not None:
                lines.append(f"Edgeworth ε = {self.edgeworth_epsilon:.3f} — estimate (not a guarantee)")
            if self.noise_multiplier is not None:
                lines.append(f"noise multiplier σ = {self.noise_multiplier:.4f}")
        else:
            lines.append("non-private baseline: no privacy guarantee (ε = ∞)")
        lines.append(f"optimizer steps: {self.steps}; wall time {self.wall_seconds:.0f} s (training {self.train_seconds:.0f} s)")
        lines.append(f"saved to {self.output_dir}")
        return lines

    def write_json(self) -> Path:
        path = Path(self.output_dir) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path


def build_trainer(
    *,
    model: Any,
    args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    tokenizer: Any,
    data_collator: Any,
    compute_metrics: Callable | None,
    privacy: PrivacySettings,
    optimizer: Any = None,
) -> Any:
    """A ``DPTrainer`` (or, for ``privacy.private=False``, a plain ``transformers.Trainer``).

    ``optimizer`` (optional) replaces the Trainer's AdamW, e.g. for per-group learning rates; the DP
    trainer wraps it like its own.
    """
    common = dict(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=data_collator, compute_metrics=compute_metrics,
    )
    if optimizer is not None:
        common["optimizers"] = (optimizer, None)
    if not privacy.private:
        from transformers import Trainer

        return Trainer(**common)
    from hf_ewtune import DPTrainer

    dp_kwargs: dict[str, Any] = dict(
        target_delta=privacy.target_delta, max_grad_norm=privacy.max_grad_norm, accountant=privacy.accountant,
        allow_large_delta=privacy.allow_large_delta,
    )
    if privacy.noise_multiplier is not None:
        dp_kwargs["noise_multiplier"] = privacy.noise_multiplier
    else:
        dp_kwargs["target_epsilon"] = privacy.target_epsilon
    return DPTrainer(**common, **dp_kwargs)


def privacy_fields(trainer: Any) -> dict[str, Any]:
    """Certified epsilon, its certifier, the Edgeworth estimate, delta and sigma from a DP trainer."""
    report = trainer.get_privacy_spent()

    def _num(*names: str) -> float | None:
        for obj in (report, trainer):
            for name in names:
                value = getattr(obj, name, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return float(value)
        return None

    eps = _num("epsilon")
    if eps is None or not math.isfinite(eps):
        logger.warning("The trainer reported no finite certified epsilon: %r", eps)
    return {
        "epsilon": eps,
        "certified_by": str(getattr(report, "certified_by", "unknown")),
        "edgeworth_epsilon": _num("edgeworth_epsilon", "epsilon_edgeworth"),
        "delta": _num("delta", "target_delta"),
        "noise_multiplier": _num("noise_multiplier", "sigma"),
        "report": str(report),
    }


def privacy_outputs(
    *, trainer: Any, privacy: PrivacySettings, output_dir: Path, write: bool = True,
) -> tuple[dict[str, Any], Path | None]:
    """For a private run: :func:`privacy_fields` and (if ``write``) the privacy-curve plot in ``output_dir``.

    A non-private run gives ``({}, None)``.
    """
    if not privacy.private:
        return {}, None
    if not write:
        return privacy_fields(trainer), None
    from hf_ewtune.recipes.plotting import plot_privacy_curve

    fields = privacy_fields(trainer)
    plot_path = plot_privacy_curve(
        log_history=trainer.state.log_history, path=Path(output_dir) / "privacy_curve.png",
        target_epsilon=privacy.target_epsilon if privacy.noise_multiplier is None else None,
        certified_by=fields["certified_by"], delta=fields["delta"],
        final=(trainer.state.global_step, fields["epsilon"], fields["edgeworth_epsilon"]) if fields["epsilon"] is not None else None,
    )
    return fields, plot_path


def training_arguments(
    *,
    output_dir: str,
    batch_size: int,
    micro_batch_size: int,
    epochs: float,
    learning_rate: float,
    seed: int,
    max_steps: int | None = None,
    save_steps: int | None = None,
    progress: bool = True,
    logging_steps: float = 0.1,
    **extra: Any,
) -> Any:
    """``TrainingArguments`` for a logical batch of ``batch_size`` = micro-batch x accumulation (CPU-friendly).

    ``save_steps`` (optional) writes a checkpoint every that many optimizer steps; a DP trainer stores the
    spent privacy with each one, so a resumed run continues its budget. ``logging_steps`` below 1 is a fraction of the run: each log entry costs a certified-epsilon
    computation (about a second), so the privacy curve gets about ``1/logging_steps`` points.

    Raises:
        ValueError: If ``batch_size`` is not a positive multiple of ``micro_batch_size``.
    """
    from transformers import TrainingArguments

    if micro_batch_size <= 0 or batch_size <= 0:
        raise ValueError(f"batch_size and micro_batch_size must be positive, got {batch_size} and {micro_batch_size}")
    micro = min(micro_batch_size, batch_size)
    if batch_size % micro:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of micro_batch_size={micro} (it is split into "
            "micro-batches for gradient accumulation): change --batch-size or --micro-batch-size."
        )
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=max(micro, 64),
        gradient_accumulation_steps=batch_size // micro,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        seed=seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=extra.pop("use_cpu", None) or _no_accelerator(),
    )
    if max_steps:
        kwargs["max_steps"] = max_steps
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def _no_accelerator() -> bool:
    import torch

    return not torch.cuda.is_available()
