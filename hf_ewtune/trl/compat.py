"""What the DP TRL trainers share: the TRL version check, the training-argument fixes and the override guard.

Example:
    >>> from hf_ewtune.trl.compat import TESTED_TRL
    >>> TESTED_TRL
    '>=1.16,<1.17'
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import Any

from hf_ewtune.errors import PrivacyConfigError

#: The TRL releases the DP trainers were tested with (setup.cfg's ``trl`` extra pins the same range).
TESTED_TRL = ">=1.16,<1.17"
_MIN, _MAX = (1, 16), (1, 17)


def require_trl() -> str:
    """Import TRL and return its version; a clear ``ImportError`` when it is missing or outside :data:`TESTED_TRL`.

    Raises:
        ImportError: TRL is not installed, or its version is outside the tested range.
    """
    try:
        import trl
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            'hf_ewtune.trl needs TRL: pip install "hf_ewtune[trl]" (tested with trl' + TESTED_TRL + ").") from exc
    version = trl.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if not (_MIN <= parts < _MAX):
        raise ImportError(
            f"hf_ewtune.trl was tested with trl{TESTED_TRL}, found trl {version}: its loss and data paths may have "
            f'changed. Install a tested release: pip install "trl{TESTED_TRL}".'
        )
    return version


def checkpointing_refused() -> bool:
    """Whether the clipping engine still refuses gradient checkpointing (hf_ewtune's argument check says so)."""
    from hf_ewtune.training_arguments import check_training_arguments

    try:
        check_training_arguments(SimpleNamespace(gradient_checkpointing=True))
    except PrivacyConfigError:
        return True
    return False


def without_checkpointing(args: Any, *, trainer_name: str) -> Any:
    """``args``, or a copy with ``gradient_checkpointing=False`` (and a warning) when the engine cannot use it.

    TRL's configs default to ``gradient_checkpointing=True``; the per-example clipping engine does not support
    it yet, so the DP trainers train without it (more activation memory: lower ``per_device_train_batch_size``
    and raise ``gradient_accumulation_steps``, or cap it with ``max_physical_batch_size``). The caller's object
    is never changed.
    """
    names = [n for n in ("gradient_checkpointing", "activation_checkpointing") if getattr(args, n, False)]
    if args is None or not names or not checkpointing_refused():
        return args
    warnings.warn(
        f"{trainer_name}: gradient_checkpointing=True (TRL's default) is turned off on the trainer's copy of the "
        "arguments: per-example clipping does not support it yet. Activation memory grows; lower "
        "per_device_train_batch_size or set max_physical_batch_size if memory runs out.",
        UserWarning,
        stacklevel=4,
    )
    args = copy.copy(args)
    for name in names:  # transformers >= 5.2x mirrors gradient_checkpointing into activation_checkpointing
        setattr(args, name, False)
    return args


def reject_bypassing_overrides(trainer: Any, *, owner: type, loss_bases: tuple[type, ...]) -> None:
    """Refuse a subclass whose ``compute_loss`` / ``training_step`` override DP-SGD would never see.

    Args:
        trainer: The trainer being built.
        owner: The DP class that defines ``compute_per_example_loss`` and ``training_step`` (e.g. ``DPSFTTrainer``).
        loss_bases: Classes whose ``compute_loss`` is the expected one (TRL's, used for evaluation only).

    Raises:
        PrivacyConfigError: naming the method and the fix (override ``compute_per_example_loss``).
    """
    cls = type(trainer)
    own_loss = cls.compute_per_example_loss is not owner.compute_per_example_loss
    overridden = []
    if cls.compute_loss not in tuple(base.compute_loss for base in loss_bases) and not own_loss:
        overridden.append("compute_loss")
    if cls.training_step is not owner.training_step:
        overridden.append("training_step")
    if overridden:
        raise PrivacyConfigError(
            f"{cls.__name__} overrides {' and '.join(overridden)}, which {owner.__name__} cannot see through: DP-SGD "
            "trains only on compute_per_example_loss(model, inputs) -> Tensor[B] (one loss per privacy unit, clipped "
            "per unit), so that override would be ignored or would bypass per-example clipping. Override "
            "compute_per_example_loss instead (and leave training_step alone)."
        )


def with_default_unit(privacy_args: Any, unit: str) -> Any:
    """``privacy_args`` with ``privacy_unit=unit`` when the user left the default ``"example"`` (a new object).

    With ``user_id_column`` set the unit is a user (``privacy_unit: user`` in the state and the card), so the
    arguments are returned unchanged: the trainer's row-level unit name would contradict it.
    """
    import dataclasses

    if privacy_args.privacy_unit.strip() != "example" or getattr(privacy_args, "user_id_column", None) is not None:
        return privacy_args
    return dataclasses.replace(privacy_args, privacy_unit=unit)


def dataset_columns(dataset: Any) -> tuple[str, ...]:
    """The column names of a dataset as the user passed it (empty when it has none), read before TRL prepares it."""
    names = getattr(dataset, "column_names", None)
    return tuple(names) if isinstance(names, (list, tuple)) else ()


def plan_users_after_preparation(trainer: Any, n: int, *, given_columns: tuple[str, ...], plan: Any) -> int:
    """``DPTrainer._plan_users`` on TRL's prepared dataset, naming TRL when it consumed the user id column.

    Args:
        trainer: The DP TRL trainer (its ``train_dataset`` is TRL's prepared one).
        n: Rows of the prepared training set.
        given_columns: The columns of the ``train_dataset`` the user passed (before TRL's preparation).
        plan: ``DPTrainer._plan_users`` bound to ``trainer``.

    Raises:
        PrivacyConfigError: the user id column was given but TRL's preparation removed it, or any of
            :func:`hf_ewtune.user_level.plan_users`'s errors.
    """
    column = getattr(trainer.privacy_args, "user_id_column", None)
    prepared = dataset_columns(trainer.train_dataset)
    if column is not None and column in given_columns and prepared and column not in prepared:
        raise PrivacyConfigError(
            f"user_id_column={column!r} is a column of the train_dataset you passed, but {type(trainer).__name__}'s "
            f"(TRL's) dataset preparation consumed it (prepared columns: {sorted(prepared)}). Copy the user ids into a "
            "column TRL does not read (e.g. dataset.add_column('user_id', ...)) and name that one.")
    return plan(n)


class TRLPrivacySeams:
    """The privacy seams every DP TRL trainer overrides the same way; put it first among the bases.

    Subclasses set ``default_unit`` (the privacy unit named on the card when no ``user_id_column`` is given)
    and ``_given_columns`` (the columns of the dataset the user passed, before TRL prepared it).
    """

    default_unit: str

    def _check_environment(self) -> None:
        # args=None: TRL built its own config (gradient_checkpointing=True by default); same treatment as a given one.
        self.args = without_checkpointing(self.args, trainer_name=type(self).__name__)
        super()._check_environment()  # type: ignore[misc]

    def _setup_privacy(self) -> None:
        self.privacy_args = with_default_unit(self.privacy_args, self.default_unit)  # left alone with user_id_column
        super()._setup_privacy()  # type: ignore[misc]

    def _plan_users(self, n: int) -> int:
        """Users (all of their rows or records) read from TRL's prepared dataset (see docs/user_level.md)."""
        plan = super()._plan_users  # type: ignore[misc]
        return plan_users_after_preparation(self, n, given_columns=self._given_columns, plan=plan)
