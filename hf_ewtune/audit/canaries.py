"""Canaries for one-run auditing: gradient canaries (white-box) and input canaries (black-box).

Each of ``m`` canaries is included in the training set independently with probability 1/2
(:func:`draw_inclusion`); the audit then scores every canary on the trained model.

**Gradient canaries** (strongest; they test the mechanism itself: clipping, noise, sampling, reduction).
:class:`GradientCanaryModel` wraps a sequence classifier with one extra trainable ``nn.Linear(m, 1)``
(``canary``, zero-initialised) that ordinary examples never touch. Canary ``j`` is a training row with
``canary_index = j`` whose logits are replaced by ``[z - z.detach(), 0, ..., 0]`` with
``z = canary(x_j)``, ``x_j = s e_j``: the logits' VALUE is always zero, so the cross-entropy gradient
w.r.t. the logits is constant, and the example's whole gradient is the fixed Dirac direction ``-e_j`` of the
canary weight with norm ``gradient_norm`` (>= C; 10 C by default), zero on every other parameter. A correct
DP-SGD step therefore puts exactly the clipped ``C`` (divided by the public ``qN``) into the gradient's
coordinate ``j`` each time the canary is sampled, plus noise; the score is minus the sum over the steps of the
released noisy gradients' coordinate ``j`` (what DP-SGD's accounting covers: every step's noisy
gradient; with plain SGD it is the final-minus-initial weight over the learning rate, but unlike the weights it
does not depend on the optimizer). Ordinary rows are unaffected: their logits are the wrapped model's.

**Input canaries** (black-box, as a user's data is seen): real examples given a wrong label (uniform over
the other classes), scored by minus their loss under the final model.

Canaries never go into anything released: the audit trains a separate model and discards it, and
:meth:`GradientCanaryModel.save_pretrained` refuses to save.

Example:
    >>> import numpy as np
    >>> inc = draw_inclusion(num_canaries=1000, seed=0)
    >>> inc.dtype == bool and 400 < int(inc.sum()) < 600
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hf_ewtune.errors import PrivacyConfigError

CANARY_COLUMN = "canary_index"


def draw_inclusion(*, num_canaries: int, seed: int | None = None) -> np.ndarray:
    """Independent fair coins: ``True`` = canary included in the training set.

    Args:
        num_canaries: m (>= 2).
        seed: Seed of the coins (``None``: fresh OS entropy).
    """
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
        raise PrivacyConfigError(f"num_canaries must be an integer >= 2, got {num_canaries!r}.")
    return np.random.default_rng(seed).random(num_canaries) < 0.5


class GradientCanaryModel(nn.Module):
    """A sequence classifier plus a Dirac gradient-canary path (see the module docstring).

    Args:
        model: The classifier to audit (its ``forward`` returns ``logits`` of shape ``[batch, num_labels]``).
        num_canaries: m.
        max_grad_norm: The clipping norm C of the run.
        gradient_multiple: Each canary's gradient norm, in units of C (>= 1; default 10, so that a
            missing or too-loose clipping shows up as a larger signal).
    """

    def __init__(self, *, model: nn.Module, num_canaries: int, max_grad_norm: float, gradient_multiple: float = 10.0) -> None:
        super().__init__()
        if not gradient_multiple >= 1.0:
            raise PrivacyConfigError(f"gradient_multiple must be >= 1 (canary gradient norm >= C), got {gradient_multiple!r}.")
        self.model = model
        self.num_canaries = int(num_canaries)
        self.gradient_norm = float(gradient_multiple) * float(max_grad_norm)
        self.canary = nn.Linear(self.num_canaries, 1, bias=False)
        nn.init.zeros_(self.canary.weight)
        self.gradient_sum: torch.Tensor | None = None
        config = getattr(model, "config", None)
        if config is not None:
            self.config = config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        canary_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """The wrapped model's logits, with canary rows' logits replaced by the canary path (no loss)."""
        inputs = {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask),
                                    ("token_type_ids", token_type_ids)) if v is not None}
        out = self.model(**inputs, **kwargs)
        logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
        if logits.dim() != 2:
            raise PrivacyConfigError(
                f"gradient canaries need a sequence classifier (logits [batch, num_labels]), got logits of shape "
                f"{tuple(logits.shape)}; use kind='input'."
            )
        if canary_index is None:
            return {"logits": logits}
        idx = canary_index.to(logits.device).long()
        is_canary = idx >= 0
        num_labels = logits.shape[-1]
        scale = self.gradient_norm / (1.0 - 1.0 / num_labels)  # |dCE/dlogit_0| = 1 - 1/L at zero logits
        x = torch.zeros(idx.shape[0], self.num_canaries, dtype=self.canary.weight.dtype, device=logits.device)
        rows = is_canary.nonzero().flatten()
        x[rows, idx[rows]] = scale
        z = self.canary(x)  # [batch, 1]
        canary_logits = nn.functional.pad(z - z.detach(), (0, num_labels - 1)).to(logits.dtype)
        return {"logits": torch.where(is_canary.unsqueeze(-1), canary_logits, logits)}

    def canary_scores(self) -> np.ndarray:
        """Minus the sum, over the optimizer steps, of the released (noisy, clipped) canary-weight gradients.

        Canary ``j``'s gradient points along ``-e_j``, so coordinate ``j`` of the score grows by about ``C / (qN)``
        each time canary ``j`` is sampled, plus noise. Recorded by :class:`CanaryGradientRecorder`.
        """
        if self.gradient_sum is None:
            return np.zeros(self.num_canaries, dtype=np.float64)
        return (-self.gradient_sum).double().cpu().numpy().reshape(-1)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refused: an audited model carries canaries and must not be released."""
        raise PrivacyConfigError(
            "an audit model carries canaries and is never saved or published; train the release model without "
            "hf_ewtune.audit."
        )


def add_gradient_canaries(*, train_dataset: Any, included: np.ndarray) -> Any:
    """``train_dataset`` (a ``datasets.Dataset``) plus one row per included gradient canary.

    Ordinary rows get ``canary_index = -1``; canary ``j`` is a copy of row 0's inputs with label 0 and
    ``canary_index = j`` (its inputs are ignored by :class:`GradientCanaryModel`).
    """
    from datasets import Dataset, Value, concatenate_datasets

    if not isinstance(train_dataset, Dataset):
        raise PrivacyConfigError(f"train_dataset must be a datasets.Dataset, got {type(train_dataset).__name__}.")
    if CANARY_COLUMN in train_dataset.column_names:
        raise PrivacyConfigError(f"train_dataset already has a {CANARY_COLUMN!r} column; rename it.")
    label_col = "labels" if "labels" in train_dataset.column_names else "label"
    if label_col not in train_dataset.column_names:
        raise PrivacyConfigError("train_dataset needs a 'labels' (or 'label') column.")
    ordinary = train_dataset.add_column(CANARY_COLUMN, [-1] * len(train_dataset))
    ordinary = ordinary.cast_column(CANARY_COLUMN, Value("int64"))
    template = dict(train_dataset[0])
    rows = [{**template, label_col: 0, CANARY_COLUMN: int(j)} for j in np.flatnonzero(included)]
    if not rows:
        return ordinary
    return concatenate_datasets([ordinary, Dataset.from_list(rows, features=ordinary.features)])


def make_input_canaries(*, pool: Any, num_canaries: int, num_labels: int, seed: int = 0) -> Any:
    """``num_canaries`` rows of ``pool`` (a tokenized ``datasets.Dataset``) with a wrong label each.

    Args:
        pool: Examples that are NOT in the training set (e.g. a held-out slice of it).
        num_canaries: m (<= ``len(pool)``).
        num_labels: Number of classes (>= 2).
        seed: Seed of the row choice and the wrong labels.
    """
    if num_labels < 2:
        raise PrivacyConfigError(f"input canaries need num_labels >= 2, got {num_labels}.")
    if num_canaries > len(pool):
        raise PrivacyConfigError(
            f"num_canaries={num_canaries} exceeds the {len(pool)} examples available for input canaries; lower "
            "the number of canaries or provide more data."
        )
    label_col = "labels" if "labels" in pool.column_names else "label"
    rng = np.random.default_rng(seed)
    chosen = pool.select(sorted(rng.choice(len(pool), size=num_canaries, replace=False).tolist()))
    shift = rng.integers(1, num_labels, size=num_canaries)
    wrong = [(int(y) + int(s)) % num_labels for y, s in zip(chosen[label_col], shift)]
    return chosen.remove_columns(label_col).add_column(label_col, wrong).cast(chosen.features)


@torch.no_grad()
def input_canary_scores(*, model: nn.Module, canaries: Any, collator: Any, batch_size: int = 64) -> np.ndarray:
    """Minus each canary's cross-entropy at its (wrong) label under ``model`` (higher = more likely trained on)."""
    label_col = "labels" if "labels" in canaries.column_names else "label"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(canaries), batch_size):
            rows = [dict(canaries[i]) for i in range(start, min(start + batch_size, len(canaries)))]
            batch = collator(rows)
            labels = torch.as_tensor(batch.pop(label_col) if label_col in batch else batch.pop("labels")).to(device)
            batch.pop("label", None)
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            out = model(**inputs)
            logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
            loss = nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
            scores += (-loss).tolist()
    finally:
        model.train(was_training)
    return np.asarray(scores, dtype=np.float64)


def canary_gradient_recorder(*, model: GradientCanaryModel) -> Any:
    """A ``TrainerCallback`` that adds the canary weight's released gradient to ``model.gradient_sum`` per step.

    It runs in ``on_optimizer_step``, after the DP optimizer noised, reduced and scaled the gradient (the
    Trainer zeroes gradients only afterwards).
    """
    from transformers import TrainerCallback

    class CanaryGradientRecorder(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            grad = model.canary.weight.grad
            if grad is None:
                return
            grad = grad.detach().float().reshape(-1).clone()
            model.gradient_sum = grad if model.gradient_sum is None else model.gradient_sum + grad

    return CanaryGradientRecorder()
