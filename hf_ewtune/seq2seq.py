"""DP-SGD for encoder-decoder models (T5, BART families): :class:`DPSeq2SeqTrainer` and the broadcast parameters.

``DPTrainer`` already trains ``*ForConditionalGeneration`` models: the per-example loss is the unshifted token
cross-entropy of the decoder logits against ``labels`` (the model shifts the labels into its decoder inputs),
averaged over that example's own label tokens (``-100`` and, when given, ``decoder_attention_mask`` excluded).
T5's RMS-style ``T5LayerNorm``, its shared (encoder + decoder + tied LM head) embedding and BART's layers are
covered by the clipping engine.

Two kinds of parameters are used *broadcast over the batch* — their module's output has no batch dimension:
T5's ``relative_attention_bias`` (an embedding of ``[query, key]`` position buckets, added to every example's
attention scores) and BART's learned positional embeddings (``embed_positions``, called on positions only). The
gradient reaching such an output is already the sum over the batch, so per-example gradients cannot be
separated there; they are refused before training, and :func:`freeze_broadcast_parameters` freezes them (a few
thousand parameters: the pretrained position tables are kept as they are).

Example:
    >>> from transformers import T5Config, T5ForConditionalGeneration
    >>> model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
    ...                                             num_heads=2, decoder_start_token_id=0))
    >>> freeze_broadcast_parameters(model)
    ['decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight']
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Seq2SeqTrainer

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.trainer import DPTrainer

logger = logging.getLogger(__name__)

#: Attribute names / class-name suffixes of modules whose output is broadcast over the batch.
BROADCAST_ATTRIBUTES = ("relative_attention_bias",)
BROADCAST_CLASS_SUFFIXES = ("LearnedPositionalEmbedding", "SinusoidalPositionalEmbedding")


def broadcast_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters of modules whose output is shared by every example of the batch."""
    names = []
    for mod_name, module in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in BROADCAST_ATTRIBUTES or type(module).__name__.endswith(BROADCAST_CLASS_SUFFIXES):
            names += [f"{mod_name}.{p}" for p, t in module.named_parameters(recurse=False) if t.requires_grad]
    return sorted(names)


def freeze_broadcast_parameters(model: torch.nn.Module) -> list[str]:
    """Freeze :func:`broadcast_parameters` (``requires_grad=False``) and return their names."""
    names = broadcast_parameters(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    if names:
        logger.info("hf_ewtune: froze %d parameter(s) used broadcast over the batch: %s", len(names), names)
    return names


def reject_broadcast_parameters(model: torch.nn.Module) -> None:
    """Raise before training when a trainable parameter is used broadcast over the batch.

    Raises:
        PrivacyConfigError: naming the parameters and the fix.
    """
    names = broadcast_parameters(model)
    if names:
        raise PrivacyConfigError(
            f"trainable parameters {names} are used broadcast over the batch (position tables shared by every "
            "example), so their per-example gradients cannot be separated for clipping. Freeze them first: "
            "hf_ewtune.seq2seq.freeze_broadcast_parameters(model) (LoRA adapters leave them frozen anyway)."
        )


class DPSeq2SeqTrainer(DPTrainer, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with DP-SGD (``DPTrainer``'s arguments; one example = one source/target pair).

    Generation-based evaluation (``predict_with_generate``) is Seq2SeqTrainer's. Parameters used broadcast over
    the batch (see the module docstring) are refused at construction, and so is a subclass overriding
    ``compute_loss`` (without ``compute_per_example_loss``) or ``training_step``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from hf_ewtune.trl.compat import reject_bypassing_overrides

        reject_bypassing_overrides(self, owner=DPSeq2SeqTrainer, loss_bases=(Seq2SeqTrainer,))
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            reject_broadcast_parameters(model)
        super().__init__(*args, **kwargs)
