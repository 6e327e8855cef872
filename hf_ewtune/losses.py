"""Per-example losses computed from logits (never HF's batch loss, never ``num_items_in_batch``).

DP-SGD clips each example's gradient, so each example needs its own loss ``l_i`` that depends on that
example alone. HF's token-count normalisation (``num_items_in_batch``) divides by a count over the whole
accumulated batch, which couples examples and breaks the sensitivity argument; here a causal-LM loss is
the mean over the sequence's OWN valid tokens (labels shifted, ``-100`` and padding masked per sequence).

Tasks:
    ``"classification"``: cross-entropy per example; ``"multi_label"``: BCE-with-logits averaged over labels;
    ``"regression"``: squared error (averaged over outputs); ``"causal_lm"``: shifted token cross-entropy,
    mean over the sequence's valid tokens; ``"token"``: unshifted token cross-entropy (token
    classification, masked LM), mean over the sequence's valid tokens.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> per_example_loss(logits, torch.tensor([0, 0]), task="classification").shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hf_ewtune.errors import PrivacyConfigError

TASKS = ("classification", "multi_label", "regression", "causal_lm", "token")


def infer_task(model: Any, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Guess the task from the model's config/class and the shapes of logits and labels.

    Args:
        model: The (possibly PEFT-wrapped) model.
        logits: Model output logits.
        labels: The batch's labels.

    Returns:
        One of :data:`TASKS`.
    """
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    if logits.dim() == 3 and labels.dim() == 2:
        return "causal_lm" if _is_causal_lm(model) else "token"
    if problem_type == "regression" or (logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point()):
        return "regression"
    if problem_type == "multi_label_classification" or (labels.dim() == 2 and labels.shape == logits.shape):
        return "multi_label"
    if logits.dim() == 2 and labels.dim() == 1:
        return "regression" if labels.is_floating_point() and logits.shape[-1] == 1 else "classification"
    raise PrivacyConfigError(
        f"cannot infer the per-example loss for logits of shape {tuple(logits.shape)} and labels of shape "
        f"{tuple(labels.shape)}; pass per_example_loss_task= to DPTrainer (one of {TASKS})."
    )


def _is_causal_lm(model: Any) -> bool:
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            try:
                base = getattr(base, attr)()
            except Exception:  # pragma: no cover - defensive
                pass
    name = type(base).__name__
    if "CausalLM" in name or "LMHeadModel" in name:
        return True
    config = getattr(base, "config", None)
    return bool(getattr(config, "is_decoder", False)) and "MaskedLM" not in name


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: str,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Loss of every example in the batch, shape ``[B]``, each depending on that example only.

    Computed in float32 (logits are upcast, e.g. under bf16 autocast).

    Args:
        logits: ``[B, C]`` (sequence tasks) or ``[B, T, V]`` (token tasks).
        labels: ``[B]`` / ``[B, C]`` / ``[B, T]``.
        task: One of :data:`TASKS`.
        attention_mask: ``[B, T]``; for token tasks, positions with mask 0 are ignored too (padding).
        ignore_index: Label value to ignore (token tasks).
        label_smoothing: ``TrainingArguments.label_smoothing_factor``: per example, exactly what
            ``transformers``' ``LabelSmoother`` gives for a batch of that one example,
            ``(1 - eps) * nll + eps * mean_c(-log p_c)`` (averaged over the example's valid tokens for token
            tasks). Only for classification and token tasks.

    Raises:
        PrivacyConfigError: unknown ``task``, or ``label_smoothing`` outside [0, 1) or with a regression /
            multi-label task.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 4, 5)
        >>> labels = torch.tensor([[1, 2, 3, -100], [1, -100, -100, -100]])
        >>> per_example_loss(logits, labels, task="causal_lm")  # uniform logits: log(5) per valid token
        tensor([1.6094, 0.0000])
    """
    logits = logits.float()
    if label_smoothing:
        if not 0.0 <= label_smoothing < 1.0:
            raise PrivacyConfigError(f"label_smoothing_factor must be in [0, 1), got {label_smoothing!r}.")
        if task not in ("classification", "causal_lm", "token"):
            raise PrivacyConfigError(
                f"label_smoothing_factor={label_smoothing:g} applies to class labels; the per-example loss task is "
                f"{task!r}. Set TrainingArguments.label_smoothing_factor=0."
            )
    if task == "classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1).long(), reduction="none",
                               label_smoothing=label_smoothing)
    if task == "regression":
        pred = logits.squeeze(-1) if logits.shape[-1] == 1 else logits
        err = (pred - labels.to(pred.dtype)) ** 2
        return err if err.dim() == 1 else err.reshape(err.shape[0], -1).mean(dim=1)
    if task == "multi_label":
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return loss.reshape(loss.shape[0], -1).mean(dim=1)
    if task in ("causal_lm", "token"):
        if task == "causal_lm":
            logits = logits[:, :-1, :]
            labels = labels[:, 1:]
            mask = attention_mask[:, 1:] if attention_mask is not None else None
        else:
            mask = attention_mask
        valid = labels != ignore_index
        if mask is not None:
            valid = valid & mask.to(torch.bool)
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe_labels.reshape(-1), reduction="none",
                              label_smoothing=label_smoothing)
        tok = tok.view(labels.shape) * valid.to(tok.dtype)
        counts = valid.sum(dim=1).clamp(min=1).to(tok.dtype)
        return tok.sum(dim=1) / counts
    raise PrivacyConfigError(f"task must be one of {TASKS}, got {task!r}.")
