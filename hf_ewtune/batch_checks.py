"""Checks of the training data before (and while) ``DPTrainer`` trains: one row is one record, ids and labels fit.

DP-SGD clips each ROW of a batch as one example; the accounting's privacy unit is that row. Three kinds of
data break this or fail late with raw torch errors, and are refused with a
:class:`~hf_ewtune.errors.PrivacyConfigError` naming the column and the fix:

* **flattened / packed rows** (TRL ``packing=True`` or ``padding_free=True``, ``DataCollatorWithFlattening``):
  several records in one row would share one clipping bound, so each would get a fraction of the stated
  protection. Detected by ``cu_seq_lens_q``/``cu_seq_lens_k``/``cu_seqlens``/``max_length_q``/``max_length_k``/
  ``seq_idx`` keys, ``seq_lens``/``seq_lengths`` with several lengths per row, or ``position_ids`` that restart
  inside a row (among its attended tokens).
* **token ids outside the model's vocabulary** (``input_ids`` < 0 or >= the input embedding's rows) and
  **empty records** (no ``input_ids`` or no attended token).
* **labels the loss would misread**: a class outside ``0..num_labels-1`` (``-100``, "ignore", is allowed),
  a token label outside the LM's vocabulary, or non-integral float labels for a classifier (cross-entropy
  would silently truncate 0.7 to class 0). Regression (``num_labels == 1`` or ``problem_type="regression"``)
  and multi-label targets keep their floats.

:func:`check_training_data` runs at ``DPTrainer`` set-up (a cheap Arrow scan of a ``datasets.Dataset``'s
columns, then the data collator on the first rows); :func:`check_micro_batch` runs on every micro-batch in
``training_step`` as a safety net. Packing done in the data itself (``run_clm.py``'s ``group_texts``: fixed
blocks of ``block_size`` tokens cut across records) cannot be seen in a batch: the unit is then a block;
declare it with ``PrivacyArguments(privacy_unit=...)`` (see docs/privacy_unit.md).

Example:
    >>> import torch
    >>> check_one_record_per_row({"input_ids": torch.ones(2, 3, dtype=torch.long),
    ...                           "position_ids": torch.tensor([[0, 1, 2], [0, 1, 2]])})
    >>> check_one_record_per_row({"input_ids": torch.ones(1, 5, dtype=torch.long),
    ...                           "position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    Traceback (most recent call last):
    ...
    hf_ewtune.errors.PrivacyConfigError: the training batch packs several records into one row (position_ids restart inside row 0, at token 3) ...
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from hf_ewtune.errors import PrivacyConfigError

logger = logging.getLogger(__name__)

FLATTENED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k", "seq_idx")
SEQ_LENGTH_KEYS = ("seq_lens", "seq_lengths")
LABEL_KEYS = ("labels", "label")
OVERFLOW_KEY = "overflow_to_sample_mapping"
DEFAULT_UNIT = "example"
IGNORE_INDEX = -100
#: Rows of the train dataset that go through the data collator at set-up.
PREVIEW_ROWS = 8
_SCAN_BATCH = 65_536

_PACKING_FIX = (
    "DP-SGD clips each row as one example, so several records in one row share one clipping bound and each is "
    "protected only at a fraction of the stated level (the accounted unit would be the row). Turn packing off "
    "(TRL: SFTConfig(packing=False, padding_free=False); transformers: DataCollatorWithPadding or "
    "DataCollatorForLanguageModeling instead of DataCollatorWithFlattening) so that each row holds one record."
)


@dataclass(frozen=True)
class ModelSizes:
    """What the model accepts: input vocabulary, LM-head vocabulary, classifier labels, problem type, task."""

    input_vocab: int | None = None
    output_vocab: int | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    task: str | None = None

    @classmethod
    def of(cls, model: Any, task: str | None = None) -> "ModelSizes":
        """Read the sizes from a (possibly PEFT-wrapped) transformers model; unknown sizes are ``None``."""
        base = model
        if hasattr(model, "get_base_model"):
            try:
                base = model.get_base_model()
            except Exception:  # pragma: no cover - defensive
                base = model
        config = getattr(base, "config", None)
        num_labels = getattr(config, "num_labels", None) if config is not None else None
        return cls(
            input_vocab=_rows(_call(model, "get_input_embeddings")),
            output_vocab=_rows(_call(base, "get_output_embeddings")),
            num_labels=int(num_labels) if isinstance(num_labels, int) else None,
            problem_type=getattr(config, "problem_type", None) if config is not None else None,
            task=task,
        )


def _call(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # models without embeddings raise NotImplementedError
        return None


def _rows(module: Any) -> int | None:
    """Rows of an embedding / outputs of a linear head (also through PEFT wrappers)."""
    if module is None:
        return None
    for attr in ("num_embeddings", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    base = getattr(module, "base_layer", None)
    return _rows(base) if base is not None and base is not module else None


# ------------------------------------------------------------------------------------ one record per row
def check_one_record_per_row(batch: Mapping[str, Any], *, where: str = "the training batch") -> None:
    """Refuse a batch whose rows hold several records (packed / padding-free / flattened collation).

    Raises:
        PrivacyConfigError: naming the key that shows the packing and how to turn it off.
    """
    for key in FLATTENED_KEYS:
        if key in batch:
            raise PrivacyConfigError(
                f"{where} has '{key}': it comes from flattened (padding-free) batching, which puts several records "
                f"into one row. {_PACKING_FIX}"
            )
    for key in SEQ_LENGTH_KEYS:
        if key in batch and _max_items_per_row(batch[key]) > 1:
            raise PrivacyConfigError(
                f"{where} has '{key}' with several sequence lengths in one row: the rows are packed. {_PACKING_FIX}"
            )
    pos = batch.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() in (1, 2) and pos.numel() > 0 and not pos.is_floating_point():
        pos = pos if pos.dim() == 2 else pos.unsqueeze(0)
        mask = batch.get("attention_mask")
        valid = mask.to(torch.bool) if isinstance(mask, torch.Tensor) and mask.shape == pos.shape else torch.ones_like(pos, dtype=torch.bool)
        floor = torch.iinfo(pos.dtype).min
        running = torch.cummax(torch.where(valid, pos, torch.full_like(pos, floor)), dim=-1).values
        before = torch.cat([torch.full_like(pos[:, :1], floor), running[:, :-1]], dim=-1)
        restart = valid & (pos <= before)
        if bool(restart.any()):
            row, tok = (int(i) for i in restart.nonzero()[0].tolist())
            raise PrivacyConfigError(
                f"{where} packs several records into one row (position_ids restart inside row {row}, at token "
                f"{tok}) as TRL packing/padding_free or DataCollatorWithFlattening do. {_PACKING_FIX}"
            )


def _max_items_per_row(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.dim() < 2:
            return 1 if value.dim() == 1 else 0
        return int((value > 0).sum(dim=-1).max()) if value.numel() else 0
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return max(len(v) for v in value)
    return 1


# --------------------------------------------------------------------------------- ids and labels
@dataclass
class ColumnStats:
    """What the checks need to know about one column (or batch entry): values, widths, first offending rows."""

    min: float | None = None
    max: float | None = None
    is_float: bool = False
    non_integral: float | None = None  # one non-integral value, if any
    empty_row: int | None = None  # first row with no token
    nested: bool = False  # one list/sequence per row (token labels) rather than one value

    def merge(self, other: "ColumnStats", offset: int = 0) -> None:
        """Fold ``other`` (the stats of later rows starting at ``offset``) into these."""
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
            self.max = other.max if self.max is None else max(self.max, other.max)
        self.is_float = self.is_float or other.is_float
        self.nested = self.nested or other.nested
        if self.non_integral is None:
            self.non_integral = other.non_integral
        if self.empty_row is None and other.empty_row is not None:
            self.empty_row = other.empty_row + offset


def tensor_stats(value: torch.Tensor, *, ignore: int | None = None, rows: bool = False,
                 mask: torch.Tensor | None = None) -> ColumnStats:
    """:class:`ColumnStats` of a collated tensor; with ``rows``, also its first row without a token (zero
    width, or ``mask`` all 0)."""
    if value.dtype == torch.bool:
        value = value.to(torch.uint8)
    stats = ColumnStats(is_float=value.is_floating_point(), nested=value.dim() >= 2)
    if rows and value.dim() >= 2 and value.shape[0] > 0:
        if value.shape[-1] == 0:
            stats.empty_row = 0
        elif mask is not None and mask.shape == value.shape:
            hits = (mask.reshape(value.shape[0], -1).sum(dim=-1) == 0).nonzero()
            stats.empty_row = int(hits[0, 0]) if hits.numel() else None
    vals = value.reshape(-1)
    if ignore is not None:
        vals = vals[vals != ignore]
    if vals.numel():
        lo, hi = torch.aminmax(vals)
        stats.min, stats.max = lo.item(), hi.item()
        if stats.is_float:
            frac = vals[vals != torch.floor(vals)]
            stats.non_integral = float(frac[0]) if frac.numel() else None
    return stats


def check_token_ids(stats: ColumnStats, sizes: ModelSizes, *, key: str, where: str) -> None:
    """Refuse empty records and token ids outside the model's input embedding."""
    if stats.empty_row is not None:
        raise PrivacyConfigError(
            f"{where}: '{key}' of row {stats.empty_row} is empty (no token, or attention_mask all 0). Remove empty "
            "records before training, e.g. dataset.filter(lambda r: len(r['input_ids']) > 0)."
        )
    if stats.min is not None and stats.min < 0:
        raise PrivacyConfigError(
            f"{where}: '{key}' holds the negative token id {stats.min:g}. Token ids must be >= 0 (-100 marks "
            "ignored positions in 'labels' only); pad input_ids with the tokenizer's pad_token_id."
        )
    if sizes.input_vocab is not None and stats.max is not None and stats.max >= sizes.input_vocab:
        raise PrivacyConfigError(
            f"{where}: '{key}' holds token id {stats.max:g} but the model's input embedding has {sizes.input_vocab} "
            f"rows (valid ids 0..{sizes.input_vocab - 1}): the tokenizer does not match the model. Tokenize with "
            "the model's own tokenizer, or call model.resize_token_embeddings(len(tokenizer)) before building DPTrainer."
        )


def check_labels(stats: ColumnStats, sizes: ModelSizes, *, key: str, where: str) -> None:
    """Refuse labels the per-example loss would misread (out of range, or floats for a classifier)."""
    task = sizes.task
    regression = sizes.problem_type == "regression" or (sizes.num_labels == 1 and not stats.nested)
    if task in ("regression", "multi_label") or (task is None and (
            regression or sizes.problem_type == "multi_label_classification")):
        return
    if stats.nested or task in ("causal_lm", "token"):
        if task is None and stats.is_float and sizes.output_vocab is None:
            return  # float targets per output (multi-label / multi-output regression), inferred from the logits
        limit, what = ((sizes.output_vocab, "the vocabulary (LM head) size") if sizes.output_vocab is not None
                       else (sizes.num_labels, "num_labels"))
        fix = "use -100 for positions to ignore (padding, prompt)"
    else:
        if task is None and sizes.num_labels is None:
            return  # not a transformers classifier: the loss is inferred from the logits' shape
        limit, what = sizes.num_labels, "num_labels"
        fix = ("map the labels to 0..num_labels-1 (e.g. with the dataset's ClassLabel feature) or build the model "
               "with the right num_labels; -100 marks an example to ignore")
    if stats.is_float and stats.non_integral is not None:
        raise PrivacyConfigError(
            f"{where}: '{key}' holds the float label {stats.non_integral:g}, but the loss is a classification "
            "cross-entropy that would truncate it to an integer class. Use integer class ids "
            "(dataset.cast_column('labels', datasets.Value('int64'))), or for regression build the model with "
            "num_labels=1 / problem_type='regression' (or pass per_example_loss_task='regression')."
        )
    if stats.min is not None and stats.min < 0:
        raise PrivacyConfigError(f"{where}: '{key}' holds {stats.min:g}, a negative label other than -100: {fix}.")
    if limit is not None and stats.max is not None and stats.max >= limit:
        raise PrivacyConfigError(
            f"{where}: '{key}' holds {stats.max:g}, outside 0..{limit - 1} ({what} = {limit}): {fix}."
        )


def check_micro_batch(inputs: Mapping[str, Any], *, model: Any, task: str | None = None,
                      where: str = "the training batch") -> None:
    """All checks on one collated (micro-)batch: one record per row, token ids, labels.

    Called by ``DPTrainer.training_step`` on every micro-batch and at set-up on the first collated rows.

    Raises:
        PrivacyConfigError: naming the batch key and the fix.
    """
    check_one_record_per_row(inputs, where=where)
    sizes = ModelSizes.of(model, task)
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        mask = inputs.get("attention_mask")
        check_token_ids(tensor_stats(ids, rows=True, mask=mask if isinstance(mask, torch.Tensor) else None), sizes,
                        key="input_ids", where=where)
    for key in LABEL_KEYS:
        labels = inputs.get(key)
        if isinstance(labels, torch.Tensor):
            check_labels(tensor_stats(labels, ignore=IGNORE_INDEX), sizes, key=key, where=where)
            break


# ------------------------------------------------------------------------------------------- set-up
def check_training_data(trainer: Any) -> None:
    """At ``DPTrainer`` set-up: scan the train dataset's columns, then collate its first rows and check them.

    Raises:
        PrivacyConfigError: packed rows, token ids or labels that do not fit the model, empty records.
    """
    dataset = trainer.train_dataset
    task = getattr(trainer, "per_example_loss_task", None)
    sizes = ModelSizes.of(trainer.model, task)
    if _is_hf_dataset(dataset):
        unit = getattr(getattr(trainer, "privacy_args", None), "privacy_unit", DEFAULT_UNIT)
        check_dataset_columns(dataset, sizes, privacy_unit=unit)
    batch = _preview_batch(trainer)
    if batch is not None:
        check_micro_batch(batch, model=trainer.model, task=task,
                          where=f"the first collated training batch (rows 0..{PREVIEW_ROWS - 1} of train_dataset)")


def _is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, datasets.Dataset)


def _preview_batch(trainer: Any) -> Mapping[str, Any] | None:
    """The data collator applied to the first rows, as ``get_train_dataloader`` would (``None`` if it fails)."""
    dataset, collator = trainer.train_dataset, trainer.data_collator
    try:
        if _is_hf_dataset(dataset):
            dataset = trainer._remove_unused_columns(dataset, description="training")
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description="training")
        rows = [dataset[i] for i in range(min(len(dataset), PREVIEW_ROWS))]
        batch = collator(rows)
    except Exception as exc:  # the real dataloader will raise it, with the user's own traceback
        logger.debug("hf_ewtune: could not collate a preview batch at set-up (%s); checking in training_step only.", exc)
        return None
    return batch if isinstance(batch, Mapping) else None


def check_dataset_columns(dataset: Any, sizes: ModelSizes, *, privacy_unit: str = "example") -> None:
    """Arrow scan of a ``datasets.Dataset``'s ``seq_lengths``/``input_ids``/``labels`` columns (no Python loop
    over rows). Datasets with an on-the-fly transform (``with_transform``) are left to the collated checks.

    With the default ``privacy_unit="example"``, an ``overflow_to_sample_mapping`` column that repeats a record
    (tokenizer ``return_overflowing_tokens=True``: one record split into several rows) is refused too.

    Raises:
        PrivacyConfigError: naming the column and the fix.
    """
    if getattr(dataset, "format", {}).get("type") == "custom":
        return
    where = "train_dataset"
    names = set(dataset.column_names)
    if privacy_unit.strip() == DEFAULT_UNIT and OVERFLOW_KEY in names and _has_adjacent_repeat(dataset, OVERFLOW_KEY):
        raise PrivacyConfigError(
            f"{where} column '{OVERFLOW_KEY}' repeats a record: the tokenizer split long records into several rows "
            "(return_overflowing_tokens=True), so one record spans several rows and the protected unit is a chunk, "
            "not an example. Truncate instead (return_overflowing_tokens=False), or declare the unit, e.g. "
            "PrivacyArguments(privacy_unit='chunk of at most 384 tokens of a record') (see docs/privacy_unit.md)."
        )
    for key in SEQ_LENGTH_KEYS:
        if key in names and _column_stats(dataset, key, lengths=True).max not in (None, 0, 1):
            raise PrivacyConfigError(
                f"{where} column '{key}' lists several sequence lengths in one row: the rows are packed. {_PACKING_FIX}"
            )
    if "input_ids" in names:
        check_token_ids(_column_stats(dataset, "input_ids"), sizes, key="input_ids", where=f"{where} column")
    for key in LABEL_KEYS:
        if key in names:
            check_labels(_column_stats(dataset, key, ignore=IGNORE_INDEX), sizes, key=key, where=f"{where} column")
            break


def _arrow_batches(dataset: Any, column: str) -> Iterator[Any]:
    if getattr(dataset, "_indices", None) is None:
        yield dataset.data.table.select([column])
        return
    yield from dataset.select_columns([column]).with_format("arrow").iter(batch_size=_SCAN_BATCH)


def _column_stats(dataset: Any, column: str, *, ignore: int | None = None, lengths: bool = False) -> ColumnStats:
    """Min/max (or, with ``lengths``, the largest row length), float-ness, first empty row, of one column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = ColumnStats()
    offset = 0
    for table in _arrow_batches(dataset, column):
        arr = table.column(column)
        stats = ColumnStats()
        if _is_list(arr.type):
            stats.nested = True
            widths = pc.list_value_length(arr)
            if lengths:
                stats.max = pc.max(widths).as_py()
                stats.min = pc.min(widths).as_py()
                total.merge(stats, offset)
                offset += len(arr)
                continue
            hit = pc.index(widths, 0).as_py()
            stats.empty_row = hit if hit is not None and hit >= 0 else None
            while _is_list(arr.type):
                arr = pc.list_flatten(arr)
        if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
            stats.is_float = pa.types.is_floating(arr.type)
            if ignore is not None:
                arr = pc.filter(arr, pc.not_equal(arr, ignore))
            mm = pc.min_max(arr).as_py()
            stats.min, stats.max = mm["min"], mm["max"]
            if stats.is_float and len(arr):
                frac = pc.filter(arr, pc.not_equal(arr, pc.floor(arr)))
                stats.non_integral = frac[0].as_py() if len(frac) else None
        total.merge(stats, offset)
        offset += len(table)
    return total


def _has_adjacent_repeat(dataset: Any, column: str) -> bool:
    """Whether two consecutive rows of the stored table carry the same value (chunks of one record are
    consecutive in a batched ``map``; a shuffled selection is checked on the table underneath it)."""
    import pyarrow.compute as pc

    arr = dataset.data.table.column(column).combine_chunks()
    return len(arr) > 1 and bool(pc.any(pc.equal(arr.slice(1), arr.slice(0, len(arr) - 1))).as_py())


def _is_list(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)
