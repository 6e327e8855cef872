"""What a built ``DPTrainer`` planned its guarantee for, and the refusal to train after any of it changed.

``DPTrainer`` plans the run when it is built: N (or U users), q, δ, σ, the accountant, the sampler and the
privacy state that the card publishes are all derived from ``privacy_args``, ``train_dataset`` and the
batch-size and step arguments as they were then. Changing one of them afterwards (``trainer.privacy_args.
sampling = "shuffled"``, ``trainer.train_dataset = other``, ``trainer.args.gradient_accumulation_steps = 4``,
an instance-level ``trainer.get_train_dataloader = ...``) would make the run differ from what the privacy
state and the model card state. :func:`check_plan_unchanged` refuses it before training (``train()`` and
``get_train_dataloader()`` call it), naming what changed and the fix: build a new ``DPTrainer``.

Example:
    >>> from types import SimpleNamespace
    >>> from hf_ewtune import PrivacyArguments
    >>> args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1, world_size=1,
    ...                        max_steps=10, num_train_epochs=1.0)
    >>> trainer = SimpleNamespace(privacy_args=PrivacyArguments(noise_multiplier=1.0), train_dataset=[1, 2],
    ...                           args=args, model=None)
    >>> trainer._frozen_plan = snapshot_plan(trainer)
    >>> check_plan_unchanged(trainer)
    >>> trainer.privacy_args.sampling = "shuffled"
    >>> check_plan_unchanged(trainer)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_ewtune.errors.PrivacyConfigError: privacy_args.sampling was changed from None to 'shuffled' after ...
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_ewtune.errors import PrivacyConfigError

#: The training arguments the sampling rate, the sampler and the planned steps were derived from.
PLANNED_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "max_steps",
                "num_train_epochs")
#: The sampling methods an instance attribute could silently replace (the class check at set-up misses these).
#: ``training_step`` is not among them: wrapping it on the instance (a spy calling the original) is legitimate.
GUARDED_METHODS = ("get_train_dataloader", "_get_train_sampler")
#: Privacy fields of ``DPTrainingArguments`` compared on ``trainer.args`` (its copy has ``max_grad_norm=0``:
#: the Trainer's batch clipping is off, C lives in ``privacy_args``).
_ARGS_PRIVACY_SKIP = ("max_grad_norm",)


@dataclass(frozen=True)
class FrozenPlan:
    """The inputs of a ``DPTrainer``'s privacy plan, as they were when it was built."""

    privacy_args: Any
    dataset: Any
    model: Any
    dataset_length: int | None
    training_args: dict[str, Any]
    args_privacy: dict[str, Any] | None


def _args_privacy_fields(args: Any) -> dict[str, Any] | None:
    from hf_ewtune.arguments import PrivacyArguments

    names = [n for n in PrivacyArguments.field_names() if n not in _ARGS_PRIVACY_SKIP]
    if not all(hasattr(args, n) for n in names):
        return None
    return {n: copy.deepcopy(getattr(args, n)) for n in names}


def snapshot_plan(trainer: Any) -> FrozenPlan:
    """The plan inputs of ``trainer`` now (call it at the end of the privacy set-up)."""
    dataset = trainer.train_dataset
    return FrozenPlan(
        privacy_args=copy.deepcopy(trainer.privacy_args),
        dataset=dataset,
        model=getattr(trainer, "model", None),
        dataset_length=len(dataset) if hasattr(dataset, "__len__") else None,
        training_args={name: getattr(trainer.args, name, None) for name in PLANNED_ARGS},
        args_privacy=_args_privacy_fields(trainer.args),
    )


def _refuse(what: str, before: Any, after: Any, planned: str) -> None:
    raise PrivacyConfigError(
        f"{what} was changed from {before!r} to {after!r} after the DPTrainer was built, but {planned} were planned "
        "with the old value (and the privacy state and model card would state that plan). Build a new DPTrainer "
        f"with the {what.split('.')[-1]} you want instead of changing it on a built one."
    )


def check_plan_unchanged(trainer: Any) -> None:
    """Raise if anything the privacy plan was derived from changed since :func:`snapshot_plan`.

    Raises:
        PrivacyConfigError: naming the changed setting (a ``privacy_args`` field, a privacy field of
            ``trainer.args``, a batch-size or step argument, ``train_dataset``, or an instance-level override
            of a method DP-SGD relies on) and the fix.
    """
    plan: FrozenPlan | None = getattr(trainer, "_frozen_plan", None)
    if plan is None:
        return
    overridden = [name for name in GUARDED_METHODS if name in vars(trainer)]
    if overridden:
        raise PrivacyConfigError(
            f"{', '.join(overridden)} was replaced on this DPTrainer instance after it was built: DP-SGD's guarantee "
            "needs DPTrainer's own sampler (a replacement silently changes the sampling while the model card still "
            "states the planned guarantee). Remove the instance attribute.")
    callback = getattr(trainer, "privacy_callback", None)
    handler = getattr(trainer, "callback_handler", None)
    if callback is not None and handler is not None and not any(cb is callback for cb in handler.callbacks):
        raise PrivacyConfigError(
            "the DPTrainer's PrivacyCallback was removed from its callbacks (remove_callback / pop_callback): it "
            "accounts every step and enforces target_epsilon, so without it the run would train unaccounted and the "
            "privacy state and model card would state 0 steps and epsilon 0. Leave it in place.")
    now = trainer.privacy_args
    for field in dataclasses.fields(plan.privacy_args):
        before, after = getattr(plan.privacy_args, field.name), getattr(now, field.name, None)
        if before != after:
            _refuse(f"privacy_args.{field.name}", before, after,
                    "sigma, q, delta, the clipping engine, the accountant and the sampler")
    if plan.args_privacy is not None:
        for name, before in plan.args_privacy.items():
            after = getattr(trainer.args, name, None)
            if before != after:
                _refuse(f"args.{name}", before, after,
                        "sigma, q, delta, the clipping engine, the accountant and the sampler")
    for name, before in plan.training_args.items():
        after = getattr(trainer.args, name, None)
        if before != after:
            _refuse(f"args.{name}", before, after, "the sampling rate q, the sampler and the planned steps")
    if plan.model is not None and getattr(trainer, "model", None) is not plan.model:
        raise PrivacyConfigError(
            "model was replaced after the DPTrainer was built: the per-example clipping hooks are on the original "
            "model, so the new one would receive only noise (no clipped gradient) while the card states a DP "
            "training of it. Build a new DPTrainer with the new model.")
    from hf_ewtune.training_arguments import check_training_arguments

    check_training_arguments(trainer.args)  # e.g. auto_find_batch_size or group_by_length switched on afterwards
    dataset = trainer.train_dataset
    if dataset is not plan.dataset:
        length = len(dataset) if hasattr(dataset, "__len__") else None
        raise PrivacyConfigError(
            f"train_dataset was replaced after the DPTrainer was built (it had {plan.dataset_length} rows, the new one "
            f"has {length}): N (or the users U and their rows), q, delta and sigma were planned for the original, so "
            "the privacy state and model card would state a guarantee for another dataset. Build a new DPTrainer "
            "with the new train_dataset.")
    if plan.dataset_length is not None and hasattr(dataset, "__len__") and len(dataset) != plan.dataset_length:
        raise PrivacyConfigError(
            f"train_dataset changed size after the DPTrainer was built ({plan.dataset_length} rows planned, "
            f"{len(dataset)} now): the sampling rate q and delta were planned for the original size. Build a new "
            "DPTrainer on the final dataset.")


__all__ = ["FrozenPlan", "GUARDED_METHODS", "PLANNED_ARGS", "check_plan_unchanged", "snapshot_plan"]
