"""``DPSFTTrainer``: TRL's ``SFTTrainer`` trained with DP-SGD (one privacy unit = one training example).

TRL prepares the data exactly as ``SFTTrainer`` does (plain text, conversational ``messages``, prompt/completion
records, chat templates, ``completion_only_loss``, ``assistant_only_loss``); each example's loss is TRL's own
definition, the mean of the per-token negative log-likelihood over that example's trained tokens (the tokens
whose label is not ``-100``; ``loss_type="dft"`` weights each token by its detached probability, as TRL does).
Then ``DPTrainer`` trains: Poisson sampling, per-example clipping in one backward, noise once per step, the
certified accountant, the privacy state in every checkpoint and the guarantee on the model card.

What differs from ``SFTTrainer`` (each checked before training):

* ``packing=True`` / ``padding_free=True`` are refused (several examples in one row would share one clipping
  bound); so are a ``compute_loss_func``, ``label_smoothing_factor > 0`` and an MoE router auxiliary loss
  (``router_aux_loss_coef``: a batch-level term that couples examples).
* ``gradient_checkpointing`` (``True`` by default in TRL's configs) is kept: the clipping engine supports it
  (reentrant and not; see :mod:`hf_ewtune.clipping.checkpointing`). :class:`DPSFTConfig` defaults it to ``False``
  (faster when memory allows) and accepts ``True``. Should an engine refuse it, the trainer's copy of the
  arguments turns it off with a warning (:func:`hf_ewtune.trl.compat.without_checkpointing`).
* The logs keep ``mean_token_accuracy``, ``entropy`` and ``num_tokens`` (computed from the logits, without
  noise: like the training loss they are statistics of the private batch and are withheld from the card).
* ``user_id_column`` (user-level DP, docs/user_level.md): the id column survives TRL's preparation (its maps keep
  other columns), the users are read from the prepared dataset, and all of a user's sampled examples are
  clipped together in one backward; the state and the card say ``privacy_unit: user``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_ewtune.trl.compat import (
    TRLPrivacySeams,
    dataset_columns,
    reject_bypassing_overrides,
    require_trl,
    without_checkpointing,
)

require_trl()

from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_ewtune.errors import PrivacyConfigError  # noqa: E402
from hf_ewtune.trainer import DPTrainer  # noqa: E402
from hf_ewtune.training_arguments import DPTrainingArguments  # noqa: E402

#: The privacy unit DPSFTTrainer protects, written into the privacy state and the card.
SFT_UNIT = "one training example (one conversation or prompt/completion record, one row; packing refused)"
#: SFT's logged statistics of the private batches (no noise): withheld from the card like the loss.
SFT_NON_PRIVATE_LOG_KEYS = ("mean_token_accuracy", "entropy", "num_tokens")

_SFT_PACKING_FIX = (
    "DP-SGD clips each row as one example, so several examples in one row would share one clipping bound and each "
    "would be protected only at a fraction of the stated level. Set SFTConfig(packing=False, padding_free=False) "
    "(each row then holds one example; use max_physical_batch_size to bound memory)."
)


@dataclass(kw_only=True)
class DPSFTConfig(SFTConfig, DPTrainingArguments):
    """``trl.SFTConfig`` plus hf_ewtune's privacy fields (``target_epsilon``, ``noise_multiplier``, ...).

    ``max_grad_norm`` is the per-example clipping norm C; ``gradient_checkpointing`` defaults to off (``None``, resolved to ``False``;
    faster when memory allows) and may be turned on. Every other field means what it means for ``SFTConfig``.

    Example:
        >>> from hf_ewtune.trl import DPSFTConfig
        >>> cfg = DPSFTConfig(output_dir="/tmp/dp-sft-doc", target_epsilon=8.0, max_grad_norm=0.5, use_cpu=True)
        >>> cfg.gradient_checkpointing, cfg.packing, cfg.privacy_args.max_grad_norm
        (False, False, 0.5)
    """

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Not supported with per-example clipping yet (TRL's default True is overridden; None = off)."},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Per-example clipping norm C of DP-SGD (> 0). The batch-gradient clipping of Trainer is off."},
    )

    def __post_init__(self) -> None:
        reject_packing(self)
        super().__post_init__()


def reject_packing(args: Any) -> None:
    """Raise for ``packing=True`` or ``padding_free=True`` with the SFT-specific fix.

    Raises:
        PrivacyConfigError: naming the setting and ``SFTConfig(packing=False, padding_free=False)``.
    """
    for name in ("packing", "padding_free"):
        if getattr(args, name, False):
            raise PrivacyConfigError(f"{name}=True puts several examples in one row. {_SFT_PACKING_FIX}")


def sft_per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, loss_type: str = "nll") -> torch.Tensor:
    """TRL's SFT loss for each example: the mean over its trained tokens (shifted labels not ``-100``), ``Tensor[B]``.

    Args:
        logits: ``[B, T, V]`` causal-LM logits.
        labels: ``[B, T]`` labels, ``-100`` on the tokens that are not trained (prompt, padding, non-assistant).
        loss_type: ``"nll"`` or ``"dft"`` (each token's NLL weighted by its detached probability).

    Example:
        >>> import torch
        >>> sft_per_example_loss(torch.zeros(2, 3, 4), torch.tensor([[-100, 1, 2], [-100, -100, 3]]))
        tensor([1.3863, 1.3863])
    """
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:]
    valid = target != -100
    logp = torch.log_softmax(logits, dim=-1)
    tok = -logp.gather(-1, torch.where(valid, target, 0).long().unsqueeze(-1)).squeeze(-1)
    if loss_type == "dft":
        tok = tok * torch.exp(-tok).detach()
    tok = tok * valid
    return tok.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


class DPSFTTrainer(TRLPrivacySeams, DPTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with differentially private training (DP-SGD, Poisson sampling, one example per unit).

    Takes ``SFTTrainer``'s arguments plus the privacy settings in one of ``DPTrainer``'s three forms:
    ``args=DPSFTConfig(...)`` (privacy fields inside; ``max_grad_norm`` is C), ``args=SFTConfig(...)`` with
    ``privacy_args=PrivacyArguments(...)``, or the privacy fields as keyword arguments. A subclass that overrides
    ``compute_loss`` or ``training_step`` must override :meth:`compute_per_example_loss` instead (refused otherwise).

    Raises:
        PrivacyConfigError: packing / padding-free batches, ``compute_loss_func``, label smoothing, an MoE auxiliary
            loss, an override DP cannot see through, or any of ``DPTrainer``'s checks (all before training).
    """

    default_unit = SFT_UNIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        reject_bypassing_overrides(self, owner=DPSFTTrainer, loss_bases=(SFTTrainer,))
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if given is not None:
            reject_packing(given)
            fixed = without_checkpointing(given, trainer_name=type(self).__name__)
            if "args" in kwargs or len(args) < 2:
                kwargs["args"] = fixed
            else:
                args = (args[0], fixed, *args[2:])
        if kwargs.get("compute_loss_func") is not None:
            raise PrivacyConfigError(
                "compute_loss_func is not supported by DPSFTTrainer (it returns a batch loss, which cannot be clipped "
                "per example). Subclass DPSFTTrainer and override compute_per_example_loss(model, inputs) -> Tensor[B]."
            )
        self._given_columns = dataset_columns(kwargs.get("train_dataset", args[3] if len(args) > 3 else None))
        super().__init__(*args, **kwargs)
        self._check_sft_settings()

    def _check_sft_settings(self) -> None:
        args = self.args
        reject_packing(args)
        if getattr(self, "padding_free", False):
            raise PrivacyConfigError(f"the SFT collator is padding-free. {_SFT_PACKING_FIX}")
        if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
            raise PrivacyConfigError(
                "label_smoothing_factor > 0 is not supported by DPSFTTrainer (TRL applies it to the batch loss); set "
                "label_smoothing_factor=0."
            )
        if args.loss_type not in ("nll", "dft"):
            raise PrivacyConfigError(f"loss_type={args.loss_type!r} is not supported by DPSFTTrainer: use 'nll' or 'dft'.")
        if getattr(self, "aux_loss_enabled", False):
            raise PrivacyConfigError(
                "the model's MoE router auxiliary loss is a batch-level term that couples examples (not clipped per "
                "example). Set SFTConfig(router_aux_loss_coef=0.0) to train without it."
            )

    def compute_per_example_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's SFT loss of each example of the micro-batch, ``Tensor[B]`` (see :func:`sft_per_example_loss`).

        Also records SFT's ``mean_token_accuracy``, ``entropy`` and ``num_tokens`` logs (no gradient).
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
        losses = sft_per_example_loss(logits, labels, loss_type=self.args.loss_type)
        self._record_sft_metrics(logits.detach(), labels, inputs.get("attention_mask"))
        return losses

    def _record_sft_metrics(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: Any) -> None:
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        with torch.no_grad():
            shift = logits[:, :-1, :].float()
            target = labels[:, 1:]
            valid = target != -100
            count = valid.sum()
            if count > 0:
                correct = ((shift.argmax(-1) == target) & valid).sum()
                logp = torch.log_softmax(shift, dim=-1)
                entropy = (-(logp.exp() * logp).sum(-1) * valid).sum()
                metrics["train"]["mean_token_accuracy"].append((correct / count).item())
                metrics["train"]["entropy"].append((entropy / count).item())
            tokens = attention_mask.sum() if isinstance(attention_mask, torch.Tensor) else torch.tensor(labels.numel())
            self._total_train_tokens += int(tokens.item())
            metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def create_model_card(self, **kwargs: Any) -> None:
        """``DPTrainer.create_model_card`` with SFT's batch statistics withheld like the loss."""
        from hf_ewtune import trainer as trainer_module

        keys = trainer_module.NON_PRIVATE_LOG_KEYS
        trainer_module.NON_PRIVATE_LOG_KEYS = tuple(dict.fromkeys((*keys, *SFT_NON_PRIVATE_LOG_KEYS)))
        try:
            super().create_model_card(**kwargs)
        finally:
            trainer_module.NON_PRIVATE_LOG_KEYS = keys
