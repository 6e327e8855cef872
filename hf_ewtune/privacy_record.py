"""The static part of a run's privacy state, built once at ``DPTrainer`` set-up.

:func:`setup_record` returns a :class:`~hf_ewtune.privacy_state.PrivacyState` holding what is fixed for
the run (clipping, batch sizes, calibration, sampling, randomness); the
:class:`~hf_ewtune.callbacks.PrivacyCallback` fills in the accounting fields (history, steps, epsilon)
whenever it writes ``_privacy_state.json``.

Example:
    >>> from hf_ewtune import PrivacyArguments
    >>> from hf_ewtune.accounting import make_accountant
    >>> from hf_ewtune.dp_settings import DPSettings
    >>> settings = DPSettings(noise_multiplier=1.0, sample_rate=0.25, expected_batch_size=8, max_grad_norm=1.0,
    ...                       sensitivity=1.0, delta=1e-5)
    >>> record = setup_record(PrivacyArguments(noise_multiplier=1.0), accountant=make_accountant("pld"),
    ...                       settings=settings, world_size=1, gradient_accumulation_steps=1,
    ...                       per_device_train_batch_size=8, planned_steps=4, steps_per_epoch=4)
    >>> record.expected_batch_size, record.poisson_sampling, record.sessions
    (8, True, [[1.0, 0.25]])
"""

from __future__ import annotations

from typing import Any

from hf_ewtune.checks import USER_UNIT
from hf_ewtune.dp_settings import DPSettings
from hf_ewtune.privacy_state import PrivacyState

SHUFFLED_NOTE = ("Batches were shuffled fixed-size batches; epsilon is certified for them by the shuffled-batch bound "
                 "(replace-one adjacency, no amplification).")
RANDOM_ALLOCATION_NOTE = ("Batches were drawn by random allocation (balls-in-bins: every example in one uniformly random "
                          "step of each epoch); epsilon is certified for them by the random-allocation bound "
                          "(add-or-remove-one adjacency).")
USER_SEED = "user-provided noise_seed (reproducible, NOT private)"
ENTROPY_SEED = "torch generators seeded from OS entropy via secrets (unpredictable, not a CSPRNG)"


def setup_record(
    privacy_args: Any,
    *,
    accountant: Any,
    settings: DPSettings,
    world_size: int,
    gradient_accumulation_steps: int,
    per_device_train_batch_size: int,
    planned_steps: int,
    steps_per_epoch: int,
    calibration: dict[str, Any] | None = None,
    users: Any = None,
) -> PrivacyState:
    """The privacy state of a run before its first step (no history yet).

    Args:
        privacy_args: The run's :class:`~hf_ewtune.arguments.PrivacyArguments`.
        accountant: The run's (fresh) accountant.
        settings: The run's frozen sigma, q, expected batch size, C and delta.
        world_size: Number of processes.
        gradient_accumulation_steps: Micro-batches per rank and optimizer step.
        per_device_train_batch_size: Expected micro-batch size per rank.
        planned_steps: Optimizer steps the run plans.
        steps_per_epoch: Steps per epoch (``round(1/q)``).
        calibration: The noise calibration record (``CalibrationResult.to_dict()``), if sigma was calibrated.
        users: The :class:`~hf_ewtune.user_level.UserPlan` of a user-level run (``None``: example level). Then
            the unit is ``"user"``, q and the expected batch count users, and the state records the number of
            users and the per-user cap.
    """
    from hf_ewtune.arguments import sampling_mode

    pa = privacy_args
    mode = sampling_mode(pa)
    expected = settings.expected_batch_size
    return PrivacyState(
        accountant=str(getattr(accountant, "name", pa.accountant)),
        accountant_state=accountant.state_dict(),
        steps=0,
        delta=settings.delta,
        noise_multiplier=settings.noise_multiplier,
        sample_rate=settings.sample_rate,
        sessions=[[settings.noise_multiplier, settings.sample_rate]],
        target_epsilon=pa.target_epsilon,
        max_grad_norm=settings.max_grad_norm,
        clipping=pa.clipping,
        sensitivity=settings.sensitivity,
        expected_batch_size=int(expected) if float(expected).is_integer() else expected,
        poisson_sampling=mode == "poisson",
        sampling_assumed_by_accounting=mode,
        sampling_note={"poisson": None, "shuffled": SHUFFLED_NOTE, "random_allocation": RANDOM_ALLOCATION_NOTE}[mode],
        world_size=world_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        planned_steps=planned_steps,
        steps_per_epoch=steps_per_epoch,
        calibration=calibration,
        certify_calibration=pa.certify_calibration,
        delta_default=pa.target_delta is None,
        randomness=USER_SEED if pa.noise_seed is not None else ENTROPY_SEED,
        allow_large_delta=bool(pa.allow_large_delta),  # delta >= 1/N opted in: the card says what it permits
        # what one training row is (PrivacyArguments.privacy_unit), or "user" for user-level DP
        privacy_unit=USER_UNIT if users is not None else str(pa.privacy_unit).strip(),
        num_users=users.num_users if users is not None else None,
        max_examples_per_user=users.max_examples_per_user if users is not None else None,
        user_id_column=users.user_id_column if users is not None else None,
    )


__all__ = ["setup_record"]
