"""``DPDPOTrainer``: TRL's ``DPOTrainer`` trained with DP-SGD; the privacy unit is one preference record.

One record is ``(prompt, chosen, rejected)``. TRL's collator stacks a batch as ``[chosen rows; rejected rows]``;
here the training batch is regrouped record by record (``chosen_*`` and ``rejected_*`` tensors of ``B`` rows),
the policy runs one forward on the chosen completions and one on the rejected ones, and the record's DPO loss
``Tensor[B]`` is backpropagated once: the clipping engine sees both forwards of record ``i`` as example ``i``,
so the gradient of the chosen AND the rejected completion are summed before the record is clipped (its norm
includes the cross terms). Noise once per step, the certified accountant and the card as in ``DPTrainer``.

The reference model is frozen and outside the accounting: its log-probabilities (computed on the fly under
``torch.no_grad()``, or precomputed with ``precompute_ref_log_probs=True``) enter only record ``i``'s own loss, and
the reference model itself is never released by training. With PEFT and no ``ref_model``, the reference is the
base model with the adapter disabled, as in TRL.

Supported: ``loss_type`` in :data:`PER_RECORD_LOSSES` (optionally weighted combinations of them) with
``f_divergence_type="reverse_kl"``. Refused before training (they couple records, or are not reproduced per
record here): ``aot``/``aot_unpaired`` (sort across the batch), ``sft`` (batch mean), ``use_weighting``,
``ld_alpha``, other f-divergences, ``sync_ref_model`` (TR-DPO), ``padding_free``, vision datasets, an MoE
auxiliary loss (``router_aux_loss_coef``).

With ``user_id_column`` (user-level DP, docs/user_level.md) one user, i.e. all of their preference records, is the
unit: the records of a user are clipped together (both completions of each), ``privacy_unit: user`` on the card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hf_ewtune.trl.compat import (
    TRLPrivacySeams,
    dataset_columns,
    reject_bypassing_overrides,
    require_trl,
    without_checkpointing,
)

require_trl()

from trl import DPOConfig, DPOTrainer  # noqa: E402

from hf_ewtune.errors import PrivacyConfigError  # noqa: E402
from hf_ewtune.trainer import DPTrainer  # noqa: E402
from hf_ewtune.training_arguments import DPTrainingArguments  # noqa: E402

#: The privacy unit DPDPOTrainer protects, written into the privacy state and the card.
DPO_UNIT = "one preference record (prompt, chosen and rejected completion; clipped together)"
#: DPO losses that are a function of one record (and its reference log-probs) only.
PER_RECORD_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm")
_PARTS = ("input_ids", "attention_mask", "completion_mask")
DPO_NON_PRIVATE_LOG_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "num_tokens")


@dataclass(kw_only=True)
class DPDPOConfig(DPOConfig, DPTrainingArguments):
    """``trl.DPOConfig`` plus hf_ewtune's privacy fields; ``max_grad_norm`` is the per-record clipping norm C.

    Example:
        >>> from hf_ewtune.trl import DPDPOConfig
        >>> cfg = DPDPOConfig(output_dir="/tmp/dp-dpo-doc", noise_multiplier=1.0, use_cpu=True)
        >>> cfg.loss_type, cfg.gradient_checkpointing
        (['sigmoid'], False)
    """

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Not supported with per-example clipping yet (TRL's default True is overridden; None = off)."},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Per-record clipping norm C of DP-SGD (> 0). The batch-gradient clipping of Trainer is off."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dpo_settings(self)


def check_dpo_settings(args: Any) -> None:
    """Raise for the DPO settings whose loss is not a function of one record (see the module docstring).

    Raises:
        PrivacyConfigError: naming the setting and the fix.
    """
    types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    bad = [t for t in types if t not in PER_RECORD_LOSSES]
    if bad:
        raise PrivacyConfigError(
            f"loss_type {bad} is not supported by DPDPOTrainer (a per-record loss is needed: 'aot' sorts across the "
            f"batch, 'sft' is a batch mean). Use one of {PER_RECORD_LOSSES}."
        )
    for name, ok, fix in (
        ("padding_free", not getattr(args, "padding_free", False), "padding_free=False"),
        ("use_weighting", not getattr(args, "use_weighting", False), "use_weighting=False"),
        ("ld_alpha", getattr(args, "ld_alpha", None) is None, "ld_alpha=None"),
        ("f_divergence_type", getattr(args, "f_divergence_type", "reverse_kl") == "reverse_kl",
         "f_divergence_type='reverse_kl'"),
        ("sync_ref_model", not getattr(args, "sync_ref_model", False), "sync_ref_model=False"),
    ):
        if not ok:
            raise PrivacyConfigError(f"{name}={getattr(args, name)!r} is not supported by DPDPOTrainer; set {fix}.")


class PairedRecordCollator:
    """Wraps TRL's preference collator: ``[chosen; rejected]`` rows become ``chosen_*`` / ``rejected_*`` of ``B`` rows.

    Example:
        >>> import torch
        >>> inner = lambda rows: {"input_ids": torch.arange(8).view(4, 2), "attention_mask": torch.ones(4, 2),
        ...                       "completion_mask": torch.ones(4, 2)}
        >>> out = PairedRecordCollator(inner)([{}, {}])
        >>> out["chosen_input_ids"].tolist(), out["rejected_input_ids"].tolist()
        ([[0, 1], [2, 3]], [[4, 5], [6, 7]])
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self.inner(rows))
        b = len(rows)
        for part in _PARTS:
            both = batch.pop(part)
            if both.shape[0] != 2 * b:
                raise PrivacyConfigError(f"the preference collator returned {both.shape[0]} '{part}' rows for {b} records.")
            batch[f"chosen_{part}"], batch[f"rejected_{part}"] = both[:b], both[b:]
        return batch


def unpaired(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :class:`PairedRecordCollator` (TRL's ``[chosen; rejected]`` layout, for evaluation)."""
    if "chosen_input_ids" not in inputs:
        return inputs
    out = {k: v for k, v in inputs.items() if not k.startswith(("chosen_", "rejected_"))}
    for part in _PARTS:
        out[part] = torch.cat([inputs[f"chosen_{part}"], inputs[f"rejected_{part}"]], dim=0)
    return out


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities of each row, ``Tensor[B]`` (TRL's ``logps``).

    Half-precision logits are upcast to float32; float64 logits stay float64.
    """
    logp = torch.log_softmax(logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * completion_mask[:, 1:].to(tok.dtype)).sum(dim=1)


def dpo_record_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, *, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, chosen_len: torch.Tensor | None = None,
                    rejected_len: torch.Tensor | None = None) -> torch.Tensor:
    """TRL's per-sequence DPO loss for each record (``reverse_kl``), ``Tensor[B]``.

    Example:
        >>> import torch
        >>> dpo_record_loss(torch.zeros(2), torch.zeros(2), loss_type="sigmoid", beta=0.1)  # log 2 at the reference
        tensor([0.6931, 0.6931])
    """
    delta = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type in ("ipo", "sigmoid_norm"):
        norm = (chosen_logratio / chosen_len.clamp(min=1.0)) - (rejected_logratio / rejected_len.clamp(min=1.0))
        return (norm - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * norm)
    raise PrivacyConfigError(f"loss_type={loss_type!r} is not per record; use one of {PER_RECORD_LOSSES}.")


class DPDPOTrainer(TRLPrivacySeams, DPTrainer, DPOTrainer):
    """TRL's ``DPOTrainer`` with DP-SGD; one preference record is one privacy unit (see the module docstring).

    Arguments are keyword-only (``model=``, ``ref_model=``, ``args=``, ``train_dataset=``, ``processing_class=``,
    ...) plus the privacy settings in one of ``DPTrainer``'s three forms (``args=DPDPOConfig(...)``,
    ``privacy_args=``, or keyword fields). A subclass must override :meth:`compute_per_example_loss`, not
    ``compute_loss`` / ``training_step`` (refused otherwise).

    Raises:
        PrivacyConfigError: a setting listed in the module docstring, an override DP cannot see through, or any of
            ``DPTrainer``'s checks (all before training).
    """

    default_unit = DPO_UNIT

    def __init__(self, *, model: Any, ref_model: Any = None, args: Any = None, **kwargs: Any) -> None:
        reject_bypassing_overrides(self, owner=DPDPOTrainer, loss_bases=(DPOTrainer, DPDPOTrainer))
        if args is not None:
            check_dpo_settings(args)
            args = without_checkpointing(args, trainer_name=type(self).__name__)
        self._given_columns = dataset_columns(kwargs.get("train_dataset"))
        super().__init__(model=model, ref_model=ref_model, args=args, **kwargs)
        if getattr(self, "_is_vision_dataset", False):
            raise PrivacyConfigError("vision preference datasets are not supported by DPDPOTrainer yet.")
        if getattr(self, "aux_loss_enabled", False):
            raise PrivacyConfigError(
                "the model's MoE router auxiliary loss is a batch-level term that couples records; set "
                "DPOConfig(router_aux_loss_coef=0.0)."
            )
        check_dpo_settings(self.args)
        self.data_collator = PairedRecordCollator(self.data_collator)

    def _micro_batch_size(self, inputs: dict[str, Any]) -> int:
        ids = inputs.get("chosen_input_ids")
        if ids is None:
            raise PrivacyConfigError("the DPO training batch has no 'chosen_input_ids' (PairedRecordCollator output).")
        return int(ids.shape[0])

    def compute_per_example_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The DPO loss of each preference record, ``Tensor[B]``: chosen and rejected forwards, one loss per record."""
        logps, lens = {}, {}
        with self.compute_loss_context_manager():
            for side in ("chosen", "rejected"):
                ids, mask = inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"]
                comp = inputs[f"{side}_completion_mask"]
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logps[side] = completion_logps(logits, ids, comp)
                lens[side] = comp.sum(dim=1).to(logps[side].dtype)  # TRL normalises by the unshifted mask
        ref_chosen, ref_rejected = self._reference_logps(inputs)
        chosen_ratio = logps["chosen"] - ref_chosen.to(logps["chosen"].dtype)
        rejected_ratio = logps["rejected"] - ref_rejected.to(logps["rejected"].dtype)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            loss = loss + weight * dpo_record_loss(
                chosen_ratio, rejected_ratio, loss_type=loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                chosen_len=lens["chosen"], rejected_len=lens["rejected"],
            )
        self._record_dpo_metrics(chosen_ratio.detach(), rejected_ratio.detach(), inputs)
        return loss

    @torch.no_grad()
    def _reference_logps(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the chosen and rejected completions (precomputed, or a no-grad forward)."""
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        import contextlib

        from accelerate.utils import is_peft_model

        context = contextlib.nullcontext()
        ref = self.ref_model
        if ref is None:
            if not is_peft_model(self.model):
                raise PrivacyConfigError("no reference model: pass ref_model=, or precompute_ref_log_probs=True.")
            from trl.trainer.dpo_trainer import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            ref = self.model
        out = []
        with context:
            for side in ("chosen", "rejected"):
                ids = inputs[f"{side}_input_ids"]
                logits = ref(input_ids=ids, attention_mask=inputs[f"{side}_attention_mask"], use_cache=False).logits
                out.append(completion_logps(logits, ids, inputs[f"{side}_completion_mask"]))
        return out[0], out[1]

    def _record_dpo_metrics(self, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, inputs: dict[str, Any]) -> None:
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        chosen, rejected = self.beta * chosen_ratio, self.beta * rejected_ratio
        metrics["train"]["rewards/chosen"].append(chosen.mean().item())
        metrics["train"]["rewards/rejected"].append(rejected.mean().item())
        metrics["train"]["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        metrics["train"]["rewards/margins"].append((chosen - rejected).mean().item())
        tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        self._total_train_tokens = getattr(self, "_total_train_tokens", 0) + int(tokens.item())
        metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """TRL's evaluation step on TRL's batch layout (not private: evaluation data is not trained on)."""
        return DPOTrainer.prediction_step(self, model, unpaired(inputs), prediction_loss_only, ignore_keys=ignore_keys)

    def create_model_card(self, **kwargs: Any) -> None:
        """``DPTrainer.create_model_card`` with DPO's batch statistics withheld like the loss."""
        from hf_ewtune import trainer as trainer_module

        keys = trainer_module.NON_PRIVATE_LOG_KEYS
        trainer_module.NON_PRIVATE_LOG_KEYS = tuple(dict.fromkeys((*keys, *DPO_NON_PRIVATE_LOG_KEYS)))
        try:
            super().create_model_card(**kwargs)
        finally:
            trainer_module.NON_PRIVATE_LOG_KEYS = keys
