"""What ``DPTrainer`` trains on: one loss per example, from :meth:`DPTrainer.compute_per_example_loss`.

DP-SGD clips each example's gradient, so the trainer needs ``Tensor[B]`` (example ``i``'s loss depending on
example ``i`` only), never the Trainer's batch loss. This module holds the default per-example loss and the
checks that keep every ``transformers`` loss setting either honoured per example or rejected at construction:

* ``TrainingArguments.label_smoothing_factor``: honoured per example (``LabelSmoother``'s formula on one
  example); rejected for regression / multi-label tasks.
* ``compute_loss_func=``: honoured per example: called once per example on that example's slice of the
  model outputs (and labels), with ``num_items_in_batch=None``.
* A subclass's ``compute_loss`` override: ``training_step`` never calls it, so a subclass that overrides it
  must also override ``compute_per_example_loss`` (its ``compute_loss`` is then used for evaluation only);
  otherwise :class:`~hf_ewtune.errors.PrivacyConfigError` at construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.losses import infer_task, per_example_loss

_SMOOTHABLE = ("classification", "causal_lm", "token")


def check_loss_settings(trainer: Any) -> None:
    """Reject, before training, loss settings the per-example path would otherwise ignore."""
    from transformers import Trainer

    from hf_ewtune.trainer import DPTrainer

    cls = type(trainer)
    if cls.compute_loss is not Trainer.compute_loss and cls.compute_per_example_loss is DPTrainer.compute_per_example_loss:
        raise PrivacyConfigError(
            f"{cls.__name__} overrides compute_loss, which DPTrainer's training_step never calls (DP-SGD needs one "
            "loss per example, not the batch loss). Override compute_per_example_loss(model, inputs) -> Tensor[B] "
            "instead (your compute_loss is then used for evaluation only), or pass compute_loss_func=."
        )
    smoothing = float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise PrivacyConfigError(f"TrainingArguments.label_smoothing_factor must be in [0, 1), got {smoothing!r}.")
    task = trainer.per_example_loss_task
    if smoothing and task is not None and task not in _SMOOTHABLE:
        raise PrivacyConfigError(
            f"TrainingArguments.label_smoothing_factor={smoothing:g} needs class labels, but per_example_loss_task="
            f"{task!r}. Set label_smoothing_factor=0, or use one of {_SMOOTHABLE}."
        )


def pop_labels(inputs: dict[str, Any]) -> torch.Tensor:
    """Remove and return ``labels`` (or ``label``) from ``inputs``; a clear error when there are none."""
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs.pop("label", None)
    if labels is None:
        raise PrivacyConfigError(
            "the training batch has no 'labels': DPTrainer computes per-example losses from the logits and "
            "the labels (for causal LM, set labels = input_ids with padding as -100), or override "
            "DPTrainer.compute_per_example_loss(model, inputs)."
        )
    return labels


def label_mask(model: Any, inputs: Mapping[str, Any]) -> Any:
    """The mask of the label positions: ``decoder_attention_mask`` for encoder-decoder models (whose
    ``attention_mask`` is the encoder's, of another length), else ``attention_mask``."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return inputs.get("decoder_attention_mask")
    return inputs.get("attention_mask")


def add_decoder_inputs(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> None:
    """Encoder-decoder models: ``decoder_input_ids`` from the labels (shifted right, as the model does when it gets
    ``labels``), since the per-example loss keeps the labels out of the forward."""
    if "decoder_input_ids" in inputs or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "prepare_decoder_input_ids_from_labels"):
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)


def default_per_example_loss(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The default of :meth:`DPTrainer.compute_per_example_loss`: forward, then one loss per example."""
    inputs = dict(inputs)
    labels = pop_labels(inputs)
    add_decoder_inputs(trainer.model, inputs, labels)
    func = getattr(trainer, "compute_loss_func", None)
    with trainer.compute_loss_context_manager():
        outputs = model(**inputs)
        if func is not None:
            return losses_one_at_a_time(func, outputs, labels)
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    task = trainer.per_example_loss_task or infer_task(trainer.model, logits, labels)
    return per_example_loss(
        logits, labels, task=task, attention_mask=label_mask(trainer.model, inputs),
        label_smoothing=float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0),
    )


def losses_one_at_a_time(func: Callable[..., torch.Tensor], outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """``Tensor[B]``: ``func`` (a ``compute_loss_func``) applied to each example's slice of outputs and labels."""
    b = labels.shape[0]
    losses = []
    for i in range(b):
        loss = func(slice_example(outputs, i, b, batch_level=None), labels[i:i + 1], num_items_in_batch=None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PrivacyConfigError(
                f"compute_loss_func must return a scalar loss tensor for one example, got "
                f"{getattr(loss, 'shape', type(loss))}."
            )
        losses.append(loss.reshape(()))
    return torch.stack(losses)


_KEEP = object()


def slice_example(value: Any, i: int, batch_size: int, *, batch_level: Any = _KEEP) -> Any:
    """``value`` restricted to example ``i``: every tensor with leading dimension ``batch_size`` becomes ``[1, ...]``.

    Other tensors (scalars, ``[1, T]`` broadcasts) are kept as they are, or replaced by ``batch_level`` when
    given: model *outputs* sliced for a ``compute_loss_func`` pass ``batch_level=None``, since a batch-level
    output (a router auxiliary loss, a batch loss) would make example ``i``'s loss depend on other examples.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch_size:
            return value[i:i + 1]
        return value if batch_level is _KEEP else batch_level
    if isinstance(value, Mapping):
        items = {k: slice_example(v, i, batch_size, batch_level=batch_level) for k, v in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    if isinstance(value, (tuple, list)):
        return type(value)(slice_example(v, i, batch_size, batch_level=batch_level) for v in value)
    return value


def batch_size_of(inputs: dict[str, Any]) -> int:
    """The number of examples in a micro-batch: from ``labels`` (or ``label``), else the first batched tensor."""
    for key in ("labels", "label"):
        t = inputs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    pop_labels(dict(inputs))  # raises the "no labels" error
    raise PrivacyConfigError("the training batch holds no tensor with a batch dimension.")


def check_per_example_losses(losses: Any, batch_size: int) -> torch.Tensor:
    """``losses`` if it is a ``Tensor[batch_size]``; otherwise a clear error naming ``compute_per_example_loss``."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        raise PrivacyConfigError(
            f"compute_per_example_loss must return one loss per example, a Tensor of shape ({batch_size},); got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}. A batch mean "
            "or sum cannot be clipped per example."
        )
    return losses
