"""User-level differential privacy: protect a person (all of their rows), not one row.

Set ``PrivacyArguments(user_id_column="author")`` (and optionally ``max_examples_per_user``). Then:

* **Sampling over users.** Each optimizer step is one Poisson draw over the U *users* at rate
  ``q = expected users per step / U``, where the expected users per step is
  ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` (in user mode the batch-size
  arguments count users, not rows). A sampled user contributes their rows; with ``max_examples_per_user=k``
  a user with more than k rows contributes a uniformly random subset of k of them, drawn afresh at every
  step from the sampling generator (the rule depends on nothing but the number of that user's rows).
* **Whole users per micro-batch.** The sampled users are dealt to the ranks (rank ``r`` takes users
  ``L[r::W]``) and cut into ``gradient_accumulation_steps`` micro-batches of whole users, so all of a
  user's rows go into ONE backward (and one rank under DDP).
* **Per-user clipping.** The clipping engine clips each user's summed gradient to C as one unit
  (:mod:`hf_ewtune.clipping.groups`); ``max_physical_batch_size`` chunks keep users whole.
* **Noise and accounting** exactly as for examples, at the user-level q and steps; the noisy sum is divided
  by the expected number of users per step. Delta defaults to ``min(1e-5, 1/(10 U))`` (rounded down to a
  power of 10). The privacy state, the card (``privacy_unit: user``), ``hf-ewtune report`` and the logs
  name the unit, the (rounded) number of users and the per-user cap.

Example:
    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"author": ["ann", "bob", "ann", "cy"], "x": [1, 2, 3, 4]})
    >>> users = plan_users(ds, user_id_column="author", max_examples_per_user=None)
    >>> users.num_users, [rows.tolist() for rows in users.user_rows]
    (3, [[0, 2], [1], [3]])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hf_ewtune.checks import USER_UNIT, check_user_arguments  # noqa: F401  (re-exported)
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.rng import seeded_generator
from hf_ewtune.sampling import PoissonBatchSampler

#: Batch key (set by :class:`UserTaggingCollator`, popped by ``DPTrainer.training_step``) holding each row's user.
UNITS_KEY = "__hf_ewtune_user_units__"
_CAP_STREAM = 7


@dataclass(frozen=True)
class UserPlan:
    """The users of a training set: who owns which rows, and the per-step cap.

    Attributes:
        user_id_column: The column holding each row's user id.
        max_examples_per_user: At most this many rows of a sampled user per step (``None``: all of them).
        row_user: ``int64[N]``: the user index (0..U-1, in order of first appearance) of every row.
        user_rows: ``U`` arrays: the rows of each user, in dataset order.
    """

    user_id_column: str
    max_examples_per_user: int | None
    row_user: np.ndarray
    user_rows: tuple[np.ndarray, ...]

    @property
    def num_users(self) -> int:
        """U, the number of distinct users."""
        return len(self.user_rows)

    @property
    def max_rows_per_step(self) -> int:
        """The most rows one sampled user contributes to a step (their row count, capped)."""
        most = max(len(r) for r in self.user_rows)
        return most if self.max_examples_per_user is None else min(most, self.max_examples_per_user)

    @functools.cached_property
    def _mean_rows(self) -> float:
        counts = np.bincount(self.row_user, minlength=self.num_users)
        if self.max_examples_per_user is not None:
            counts = np.minimum(counts, self.max_examples_per_user)
        return float(counts.mean())

    def mean_rows_per_step(self) -> float:
        """Mean rows a sampled user contributes (for the un-noised loss log only; not a privacy quantity)."""
        return self._mean_rows


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _column_values(dataset: Any, column: str) -> list[Any]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if column not in names:
            raise PrivacyConfigError(
                f"user_id_column={column!r} is not a column of train_dataset (columns: {sorted(names)}). Add a "
                "column with each row's user id, or name the right one.")
        return list(dataset[column])
    values = []
    for i in range(len(dataset)):
        row = dataset[i]
        if not isinstance(row, Mapping) or column not in row:
            raise PrivacyConfigError(
                f"user_id_column={column!r}: row {i} of train_dataset has no such key (rows must be mappings "
                "holding each row's user id).")
        values.append(row[column])
    return values


def plan_users(dataset: Any, *, user_id_column: str, max_examples_per_user: int | None) -> UserPlan:
    """Read the users of ``dataset`` from its ``user_id_column`` (before training).

    Raises:
        PrivacyConfigError: the column is missing, a user id is missing/null/NaN, or not hashable.
    """
    index: dict[Hashable, int] = {}
    row_user = np.empty(len(dataset), dtype=np.int64)
    for i, value in enumerate(_column_values(dataset, user_id_column)):
        if _is_missing(value):
            raise PrivacyConfigError(
                f"user_id_column={user_id_column!r}: row {i} has no user id ({value!r}). Every row needs its user; "
                "drop the row or give it its user's id (a row of an unknown user cannot be bounded per user).")
        try:
            u = index.setdefault(value, len(index))
        except TypeError:
            raise PrivacyConfigError(
                f"user_id_column={user_id_column!r}: row {i} holds a {type(value).__name__} ({value!r}), which is not "
                "hashable, so rows cannot be grouped by user. Use a string or integer user id column.") from None
        row_user[i] = u
    order = np.argsort(row_user, kind="stable")
    bounds = np.cumsum(np.bincount(row_user, minlength=len(index)))[:-1]
    return UserPlan(user_id_column, max_examples_per_user, row_user, tuple(np.split(order, bounds)))


def check_enough_users(plan: UserPlan, expected_users: int, *, per_device: int, ga: int, world: int) -> None:
    """Raise when the expected users per step exceed the number of users (q > 1)."""
    if expected_users > plan.num_users:
        raise PrivacyConfigError(
            f"user-level privacy (user_id_column={plan.user_id_column!r}): the expected users per step "
            f"per_device_train_batch_size x gradient_accumulation_steps x world_size = {per_device} x {ga} x {world} "
            f"= {expected_users} exceeds the number of users U={plan.num_users} (sample rate q > 1). In user mode the "
            "batch size counts users: lower per_device_train_batch_size or gradient_accumulation_steps.")


def setup_users(trainer: Any) -> UserPlan | None:
    """``DPTrainer`` set-up step: the :class:`UserPlan` of ``trainer.train_dataset`` (``None`` at example level).

    Raises:
        PrivacyConfigError: bad user ids (see :func:`plan_users`) or fewer users than expected per step.
    """
    pa = trainer.privacy_args
    if pa.user_id_column is None:
        return None
    plan = plan_users(trainer.train_dataset, user_id_column=pa.user_id_column,
                      max_examples_per_user=pa.max_examples_per_user)
    args = trainer.args
    per_device, ga, world = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps), int(args.world_size)
    check_enough_users(plan, per_device * ga * world, per_device=per_device, ga=ga, world=world)
    return plan


def user_dataloader_parts(trainer: Any, dataset: Any, collator: Callable[[list[Any]], Any],
                          sampler_kwargs: dict[str, Any]) -> tuple[UserPoissonBatchSampler, Any, Callable]:
    """``(batch sampler, dataset, collator)`` of ``DPTrainer.get_train_dataloader`` in user mode."""
    plan = trainer.user_plan
    sampler = UserPoissonBatchSampler(plan, trainer.sample_rate, **sampler_kwargs)
    return sampler, UserTaggedDataset(dataset, plan.row_user), UserTaggingCollator(collator, plan.user_id_column)


def check_resumed_unit(state: Any, plan: UserPlan | None, privacy_unit: str) -> None:
    """Refuse to resume a checkpoint whose privacy unit differs from this run's.

    Steps accounted for examples give no user-level guarantee (and vice versa), steps accounted for users of one
    ``user_id_column`` none for the users of another, and steps accounted for one declared ``privacy_unit`` (e.g.
    a 1024-token block) none for another: one history cannot mix them, since the card states ONE unit.

    Raises:
        PrivacyStateError: the checkpoint was trained at user level and this run is not, or the reverse; or with
            another ``user_id_column``; or with another ``privacy_unit``.
    """
    from hf_ewtune.errors import PrivacyStateError
    from hf_ewtune.model_card import privacy_unit_of

    theirs = privacy_unit_of({"privacy_unit": getattr(state, "privacy_unit", None)})
    mine = USER_UNIT if plan is not None else privacy_unit_of({"privacy_unit": privacy_unit})
    if (theirs == USER_UNIT) != (mine == USER_UNIT):
        raise PrivacyStateError(
            f"the checkpoint's privacy unit is {theirs!r} but this run's is {mine!r}: an accountant history cannot "
            "mix user-level and example-level steps (the composed epsilon would hold for neither unit). Resume "
            "with the same user_id_column setting, or start a new run.")
    if plan is not None:
        column = getattr(state, "user_id_column", None)
        if column is not None and column != plan.user_id_column:
            raise PrivacyStateError(
                f"the checkpoint's users were read from user_id_column={column!r} but this run reads them from "
                f"user_id_column={plan.user_id_column!r}: an accountant history cannot mix two notions of a user (the "
                f"composed epsilon would hold for neither). Resume with user_id_column={column!r}, or start a new run.")
    elif theirs != mine:
        raise PrivacyStateError(
            f"the checkpoint's privacy unit is {theirs!r} but this run's privacy_unit is {mine!r}: the accountant "
            "history was composed for the checkpoint's unit, so the card could not state one unit for the whole "
            f"run. Resume with privacy_unit={theirs!r} (the rows must be built the same way), or start a new run.")


class UserPoissonBatchSampler(PoissonBatchSampler):
    """One Poisson draw over USERS per logical batch; whole users dealt to ranks and micro-batches.

    Args:
        plan: The users of the training set.
        sample_rate: User inclusion probability q.
        **kwargs: As for :class:`~hf_ewtune.sampling.PoissonBatchSampler` (``num_micro_batches``, ``rank``, ...).

    Example:
        >>> import numpy as np
        >>> plan = UserPlan("u", 2, np.array([0, 0, 0, 1]), (np.array([0, 1, 2]), np.array([3])))
        >>> s = UserPoissonBatchSampler(plan, 1.0, num_micro_batches=1, seed=0)
        >>> [sorted(b) for b in s][0][-1], len(list(s)[0])  # row 3, plus 2 of user 0's 3 rows
        (3, 3)
    """

    def __init__(self, plan: UserPlan, sample_rate: float, **kwargs: Any) -> None:
        super().__init__(plan.num_users, sample_rate, **kwargs)
        self.plan = plan

    def user_rows(self, users: torch.Tensor, step: int, epoch: int | None = None) -> list[np.ndarray]:
        """The rows each user of a logical batch contributes (capped subsets drawn the same way on every rank)."""
        epoch = self.epoch if epoch is None else int(epoch)
        cap = self.plan.max_examples_per_user
        gen = None
        out = []
        for u in users.tolist():
            rows = self.plan.user_rows[u]
            if cap is not None and len(rows) > cap:
                if gen is None:
                    gen = seeded_generator("cpu", self.seed, epoch, step, _CAP_STREAM)
                rows = np.sort(rows[torch.randperm(len(rows), generator=gen)[:cap].numpy()])
            out.append(rows)
        return out

    def split(self, logical_batch: torch.Tensor, rows: list[np.ndarray] | None = None) -> list[list[int]]:
        """This rank's ``GA`` micro-batches of row indices; each holds whole users."""
        if rows is None:
            rows = self.user_rows(logical_batch, 0)
        local = list(range(self.rank, len(rows), self.world_size))
        out = []
        for chunk in np.array_split(np.array(local, dtype=np.int64), self.micro_batches_per_rank):
            out.append([int(r) for k in chunk.tolist() for r in rows[k]])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step, users in enumerate(self.logical_batches()):
            yield from self.split(users, self.user_rows(users, step))


class UserTaggedDataset(torch.utils.data.Dataset):
    """A view of the training set whose rows carry their user index under :data:`UNITS_KEY`."""

    def __init__(self, dataset: Any, row_user: np.ndarray) -> None:
        self.dataset = dataset
        self.row_user = row_user

    def __len__(self) -> int:
        return len(self.dataset)

    def _tag(self, row: Any, i: int) -> dict[str, Any]:
        return {**row, UNITS_KEY: int(self.row_user[i])}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._tag(self.dataset[i], i)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._tag(r, i) for r, i in zip(rows, indices)]


class UserTaggingCollator:
    """Wrap a collate function: drop the user id column and add ``UNITS_KEY: LongTensor[B]`` (rows' users)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], user_id_column: str) -> None:
        self.collate_fn = collate_fn
        self.user_id_column = user_id_column

    def __call__(self, features: list[Any]) -> Any:
        units = torch.tensor([f[UNITS_KEY] for f in features], dtype=torch.long)
        drop = (UNITS_KEY, self.user_id_column)
        batch = self.collate_fn([{k: v for k, v in f.items() if k not in drop} for f in features])
        batch[UNITS_KEY] = units
        return batch


def whole_unit_chunks(batch_size: int, limit: int, units: torch.Tensor | None) -> list[Any]:
    """Row selections of at most ``limit`` rows each (slices), keeping every unit's rows in one chunk.

    A unit larger than ``limit`` gets a chunk of its own (its rows must be clipped together).

    Example:
        >>> import torch
        >>> [c.tolist() for c in whole_unit_chunks(5, 2, torch.tensor([0, 0, 1, 1, 1]))]
        [[0, 1], [2, 3, 4]]
        >>> whole_unit_chunks(3, 2, None)
        [slice(0, 2, None), slice(2, 4, None)]
    """
    if units is None:
        return [slice(start, start + limit) for start in range(0, batch_size, limit)]
    ids, inv = torch.unique(units, return_inverse=True)
    chunks, current, size = [], [], 0
    for u in range(len(ids)):
        rows = (inv == u).nonzero().flatten()
        if current and size + len(rows) > limit:
            chunks.append(torch.cat(current))
            current, size = [], 0
        current.append(rows)
        size += len(rows)
    if current:
        chunks.append(torch.cat(current))
    return chunks


__all__ = [
    "UNITS_KEY", "USER_UNIT", "UserPlan", "UserPoissonBatchSampler", "UserTaggedDataset", "UserTaggingCollator",
    "check_enough_users", "check_resumed_unit", "check_user_arguments", "plan_users", "setup_users", "user_dataloader_parts",
    "whole_unit_chunks",
]
