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

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_ewtune.dp_settings import DPSettings, HoldsDPSettings, read_only_setting
from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from hf_ewtune.privacy_state import PrivacyState, as_privacy_state

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


def _dp_optimizer(optimizer: Any) -> Any:
    """The :class:`~hf_ewtune.noise.DPOptimizer` inside ``optimizer`` (accelerate wraps it), or ``None``."""
    from hf_ewtune.noise import DPOptimizer

    for _ in range(4):
        if optimizer is None or isinstance(optimizer, DPOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def require_noisy_optimizer(optimizer: Any) -> None:
    """Raise unless ``optimizer`` (the Trainer's, possibly wrapped by accelerate) adds DP noise; ``None`` passes.

    ``DPTrainer.training_step`` calls it before the first backward of every step, so an optimizer that
    bypasses :class:`~hf_ewtune.noise.DPOptimizer` (a subclass's ``create_optimizer`` override that does not call
    ``super()``, an optimizer swapped in afterwards) is refused before it takes a single noiseless step.

    Raises:
        PrivacyStateError: naming the optimizer and the fix.
    """
    if optimizer is not None and _dp_optimizer(optimizer) is None:
        raise PrivacyStateError(
            f"the training optimizer ({type(optimizer).__name__}) is not a DPOptimizer: its steps would add no noise. "
            "Let DPTrainer.create_optimizer wrap the optimizer (an override must return super().create_optimizer()).")


class PrivacyCallback(TrainerCallback, HoldsDPSettings):
    """Steps the accountant, logs epsilon, enforces the budget and checkpoints the privacy state.

    sigma, q and delta are read from ``settings``, the same frozen
    :class:`~hf_ewtune.dp_settings.DPSettings` the optimizer adds noise with; at every step the callback
    also checks that the optimizer's last step used exactly these settings
    (:class:`~hf_ewtune.errors.PrivacyStateError` otherwise), so the accountant composes the noise that
    was really added.

    Args:
        accountant: An ``hf_ewtune.accounting`` accountant (fresh, or restored from a checkpoint).
        accountant_name: ``"edgeworth"``, ``"pld"`` or ``"rdp"`` (recorded).
        settings: The run's frozen sigma, q, expected batch size, C and delta.
        target_epsilon: Budget to enforce (``None``: report only).
        budget_steps: Total accountant steps allowed within ``target_epsilon`` (``None``: unlimited).
        record: The static part of the privacy state written at set-up (clipping, calibration, batch
            sizes, ...): a :class:`~hf_ewtune.privacy_state.PrivacyState` whose accounting fields
            :meth:`privacy_state` fills in.
    """

    def __init__(
        self,
        *,
        accountant: Any,
        accountant_name: str,
        settings: DPSettings,
        target_epsilon: float | None = None,
        budget_steps: int | None = None,
        record: PrivacyState | None = None,
    ) -> None:
        if not isinstance(settings, DPSettings) or settings.sample_rate is None or settings.delta is None:
            raise PrivacyConfigError("PrivacyCallback needs settings=DPSettings(...) with sample_rate and delta.")
        self.accountant = accountant
        self.accountant_name = accountant_name
        self._settings = settings
        self.target_epsilon = target_epsilon
        self.budget_steps = budget_steps
        self.record = record if record is not None else PrivacyState(
            accountant=accountant_name, accountant_state=accountant.state_dict(), steps=accountant.steps)
        # [sigma, q] of earlier sessions whose steps a resumed history holds (see PrivacyState.sessions).
        self._earlier_sessions: list[list[float]] = []
        self.stopped_early = False
        self._report_cache: tuple[int, Any] | None = None
        self._last_state: TrainerState | None = None
        #: What added the noise when it is not the optimizer (DeepSpeed: ``ZeroTrainerFeed``); checked like a
        #: ``DPOptimizer`` (``last_step_settings``) at every step.
        self.noise_source: Any = None

    noise_multiplier = read_only_setting("noise_multiplier", holder="_settings", owner="PrivacyCallback")
    sample_rate = read_only_setting("sample_rate", holder="_settings", owner="PrivacyCallback")
    delta = read_only_setting("delta", holder="_settings", owner="PrivacyCallback")

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

    def _privacy_spent_or_none(self) -> Any:
        """:meth:`privacy_spent`, or None (with an error logged) if computing it fails.

        Logging, checkpointing and the end of training call this: a failure of the accountant there must not
        abort ``train()`` or ``save_model`` and lose the trained weights. No epsilon is reported then (never a
        made-up one); the accountant history is still saved, so ``hf-ewtune report`` can recompute it.
        """
        try:
            return self.privacy_spent()
        except Exception as exc:  # noqa: BLE001 - see docstring: the weights matter more than this log line
            logger.error(
                "could not compute the privacy spent after %d steps (%s: %s); no epsilon is logged. The model and "
                "the accountant history are saved as usual: recompute it with `hf-ewtune report OUTPUT_DIR`.",
                self.steps, type(exc).__name__, exc,
            )
            return None

    def epsilon_logs(self) -> dict[str, float]:
        """``{"epsilon": certified, "epsilon_edgeworth": estimate}`` for the steps taken so far (``{}`` if the
        accountant fails: see :meth:`_privacy_spent_or_none`)."""
        if self.steps == 0:
            return {"epsilon": 0.0}
        report = self._privacy_spent_or_none()
        if report is None:
            return {}
        out = {"epsilon": float(report.epsilon)}
        edgeworth = getattr(report, "edgeworth_epsilon", None)
        if edgeworth is not None:
            out["epsilon_edgeworth"] = float(edgeworth)
        return out

    def load_state(self, state: PrivacyState | Mapping[str, Any]) -> None:
        """Restore the accountant history, the stop flag and the earlier sessions from a saved state.

        Raises:
            PrivacyStateError: ``state`` fails :meth:`PrivacyState.from_dict`'s checks.
        """
        state = as_privacy_state(state)
        self.accountant.load_state_dict(state.accountant_state)
        self.stopped_early = bool(state.stopped_early)
        self._earlier_sessions = [list(pair) for pair in state.sessions]
        self._report_cache = None

    def _sessions(self) -> list[list[float]]:
        sessions = [list(pair) for pair in self._earlier_sessions]
        mine = [self.noise_multiplier, self.sample_rate]
        if not sessions or sessions[-1] != mine:
            sessions.append(mine)
        return sessions

    def privacy_state(self, trainer_state: TrainerState | None = None) -> PrivacyState:
        """The typed privacy state: accountant history, settings, epsilon so far. No RNG state."""
        trainer_state = trainer_state or self._last_state
        report = self._privacy_spent_or_none() if self.steps > 0 else None
        edgeworth = getattr(report, "edgeworth_epsilon", None) if report is not None else None
        versions = _library_versions()
        return dataclasses.replace(
            self.record,
            accountant=self.accountant_name,
            accountant_state=self.accountant.state_dict(),
            steps=self.steps,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            sessions=self._sessions(),
            target_epsilon=self.target_epsilon,
            budget_steps=self.budget_steps,
            epsilon=float(report.epsilon) if report is not None else (0.0 if self.steps == 0 else None),
            epsilon_certified_by=getattr(report, "certified_by", None) or getattr(self.accountant, "certified_by", None),
            epsilon_edgeworth=None if edgeworth is None else float(edgeworth),
            stopped_early=self.stopped_early,
            global_step=None if trainer_state is None else trainer_state.global_step,
            epochs=None if trainer_state is None else trainer_state.epoch,
            versions=versions,
            library_version=versions.get("hf_ewtune"),
        )

    def state_dict(self, trainer_state: TrainerState | None = None) -> dict[str, Any]:
        """The JSON-ready privacy state (:meth:`privacy_state` as the dict written to ``_privacy_state.json``)."""
        return self.privacy_state(trainer_state).to_dict()

    def _check_optimizer(self, optimizer: Any) -> None:
        dp = self.noise_source if self.noise_source is not None else _dp_optimizer(optimizer)
        if self.noise_source is not None and dp.last_step_settings is None:
            raise PrivacyStateError(
                f"a training step ended but {type(dp).__name__} added no noise yet: the step cannot be accounted.")
        if optimizer is not None and dp is None:
            raise PrivacyStateError(
                f"the training optimizer ({type(optimizer).__name__}) is not a DPOptimizer: the step took no noise, "
                "so it cannot be accounted. Let DPTrainer.create_optimizer wrap the optimizer.")
        used = getattr(dp, "last_step_settings", None)
        if used is None or used is self._settings:
            return
        mine = self._settings
        if (used.noise_multiplier, used.sensitivity, used.expected_batch_size) != (
                mine.noise_multiplier, mine.sensitivity, mine.expected_batch_size):
            raise PrivacyStateError(
                f"the optimizer's last step added noise with noise_multiplier={used.noise_multiplier}, sensitivity="
                f"{used.sensitivity}, expected_batch_size={used.expected_batch_size}, but the accountant composes "
                f"noise_multiplier={mine.noise_multiplier}, sensitivity={mine.sensitivity}, expected_batch_size="
                f"{mine.expected_batch_size}. The optimizer was replaced or modified after set-up; build a new "
                "DPTrainer instead."
            )

    # ---- TrainerCallback hooks --------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        self._check_optimizer(kwargs.get("optimizer"))
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
                self.privacy_state(state).save(folder)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last_state = state
        logs = self.epsilon_logs() if self.steps > 0 else {}
        if "epsilon" in logs:
            eps = logs["epsilon"]
            logger.info(
                "DP training done: %d steps, epsilon = %s (certified by %s, delta=%.3g; sampling: %s)%s.",
                self.steps,
                "inf" if math.isinf(eps) else f"{eps:.4g}",
                getattr(self.accountant, "certifier_label", "?"),
                self.delta,
                getattr(self.accountant, "sampling", "Poisson sampling"),
                f"; Edgeworth estimate {logs['epsilon_edgeworth']:.4g} (not a guarantee)" if "epsilon_edgeworth" in logs else "",
            )
        return control
