"""``PrivacyCallback``: privacy accounting, budget enforcement and privacy-state checkpoints.

:class:`~hf_ewtune.DPTrainer` installs it itself. Per optimizer step (``on_step_end``) it steps the
accountant with the sigma and q actually used — empty logical batches included. On every log it adds
``epsilon`` (certified upper bound, by default from the PLD accountant) and ``epsilon_edgeworth``
(the EW-Tune estimate, not a guarantee) to the logs, so ``report_to`` trackers receive them; the
certified value is recomputed only when the step count changed since the last log/evaluate/save/end,
not at every step. With a target epsilon it stops training (``control.should_training_stop``) after the
last step that stays within the target, with a logged message. On ``on_save`` it writes
``_privacy_state.json`` into the checkpoint folder.

Example:
    >>> from hf_ewtune.callbacks import PrivacyCallback
    >>> PrivacyCallback.__name__
    'PrivacyCallback'
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_ewtune.privacy_state import save_privacy_state

logger = logging.getLogger(__name__)


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    versions: dict[str, str] = {}
    try:
        import hf_ewtune

        versions["hf_ewtune"] = hf_ewtune.__version__
    except Exception:  # pragma: no cover - defensive
        pass
    for dist in ("dp-accounting", "torch", "transformers", "accelerate", "peft"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


class PrivacyCallback(TrainerCallback):
    """Steps the accountant, logs epsilon, enforces the budget and checkpoints the privacy state.

    Args:
        accountant: An ``hf_ewtune.accounting`` accountant (fresh, or restored from a checkpoint).
        accountant_name: ``"edgeworth"``, ``"pld"`` or ``"rdp"`` (recorded).
        noise_multiplier: sigma used at every step.
        sample_rate: q used at every step.
        delta: delta of the reported (epsilon, delta).
        target_epsilon: Budget to enforce (``None``: report only).
        budget_steps: Total accountant steps allowed within ``target_epsilon`` (``None``: unlimited).
        config: Extra, static fields of the privacy state (clipping, C, expected batch size, calibration, ...).
    """

    def __init__(
        self,
        *,
        accountant: Any,
        accountant_name: str,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        target_epsilon: float | None = None,
        budget_steps: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.accountant = accountant
        self.accountant_name = accountant_name
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.target_epsilon = target_epsilon
        self.budget_steps = budget_steps
        self.config = dict(config or {})
        self.stopped_early = False
        self._report_cache: tuple[int, Any] | None = None
        self._last_state: TrainerState | None = None

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Optimizer steps accounted so far (all runs, including restored history)."""
        return int(self.accountant.steps)

    def privacy_spent(self) -> Any:
        """The ``PrivacyReport`` for the steps taken so far (cached until the step count changes)."""
        steps = self.steps
        if self._report_cache is None or self._report_cache[0] != steps:
            self._report_cache = (steps, self.accountant.get_privacy_spent(delta=self.delta))
        return self._report_cache[1]

    def epsilon_logs(self) -> dict[str, float]:
        """``{"epsilon": certified, "epsilon_edgeworth": estimate}`` for the steps taken so far."""
        if self.steps == 0:
            return {"epsilon": 0.0}
        report = self.privacy_spent()
        out = {"epsilon": float(report.epsilon)}
        edgeworth = getattr(report, "edgeworth_epsilon", None)
        if edgeworth is not None:
            out["epsilon_edgeworth"] = float(edgeworth)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the accountant history (and the stop flag) from a saved privacy state."""
        self.accountant.load_state_dict(state["accountant_state"])
        self._report_cache = None

    def state_dict(self, trainer_state: TrainerState | None = None) -> dict[str, Any]:
        """The JSON-ready privacy state: accountant history, settings, epsilon so far. No RNG state."""
        trainer_state = trainer_state or self._last_state
        report = self.privacy_spent() if self.steps > 0 else None
        epsilon = float(report.epsilon) if report is not None else 0.0
        edgeworth = getattr(report, "edgeworth_epsilon", None) if report is not None else None
        state = {
            "accountant": self.accountant_name,
            "accountant_state": self.accountant.state_dict(),
            "steps": self.steps,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "budget_steps": self.budget_steps,
            "epsilon": epsilon,
            "epsilon_certified_by": getattr(report, "certified_by", None)
            or getattr(self.accountant, "certified_by", None),
            "epsilon_edgeworth": None if edgeworth is None else float(edgeworth),
            "stopped_early": self.stopped_early,
            "global_step": None if trainer_state is None else trainer_state.global_step,
            "epochs": None if trainer_state is None else trainer_state.epoch,
            "versions": _library_versions(),
            "library_version": _library_versions().get("hf_ewtune"),
        }
        state.update(self.config)
        return state

    # ---- TrainerCallback hooks --------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, num_steps=1)
        if self.budget_steps is not None and self.steps >= self.budget_steps and not control.should_training_stop:
            self.stopped_early = True
            control.should_training_stop = True
            control.should_log = True
            if args.save_strategy != "no":
                control.should_save = True
            logger.warning(
                "Privacy budget reached: stopping training after step %d (%d DP steps in total). Another step "
                "would exceed target_epsilon=%s at delta=%.3g (certified). Final epsilon is logged as 'epsilon'.",
                state.global_step, self.steps, self.target_epsilon, self.delta,
            )
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs: Any):
        if logs is not None:
            for key, value in self.epsilon_logs().items():
                logs.setdefault(key, value)
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs: Any):
        if metrics is not None:
            for key, value in self.epsilon_logs().items():
                metrics.setdefault(key, value)
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_privacy_state(folder, self.state_dict(state))
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        if self.steps > 0:
            logs = self.epsilon_logs()
            eps = logs["epsilon"]
            logger.info(
                "DP training done: %d steps, epsilon = %s (certified, delta=%.3g)%s.",
                self.steps,
                "inf" if math.isinf(eps) else f"{eps:.4g}",
                self.delta,
                f"; Edgeworth estimate {logs['epsilon_edgeworth']:.4g} (not a guarantee)" if "epsilon_edgeworth" in logs else "",
            )
        return control
