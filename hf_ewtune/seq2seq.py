"""DP-SGD for encoder-decoder models (T5, BART families): :class:`DPSeq2SeqTrainer` and the broadcast parameters.

``DPTrainer`` already trains ``*ForConditionalGeneration`` models: the per-example loss is the unshifted token
cross-entropy of the decoder logits against ``labels`` (the model shifts the labels into its decoder inputs),
averaged over that example's own label tokens (``-100`` and, when given, ``decoder_attention_mask`` excluded).
T5's RMS-style ``T5LayerNorm``, its shared (encoder + decoder + tied LM head) embedding and BART's layers are
covered by the clipping engine.

Position tables are trained and clipped per example like every other parameter:

* T5's ``relative_attention_bias`` (and mT5's, UMT5's, LongT5's, ...: any ``relative_attention_bias``
  embedding whose attention module has ``compute_bias``) gives a bias without a batch dimension that every
  example's attention scores add (T5 passes block 0's bias on to every later block). While the clipping engine
  is attached, the bias is expanded to the batch, so each example's gradient of the table (summed over every
  layer that uses it) is exact: see :mod:`hf_ewtune.clipping.relative_bias`.
* BART's / mBART's learned positional embeddings (``embed_positions``) build batched position ids
  (``arange(T).expand(B, T)``), so their per-example gradients are exact (torch.func rule).

Still *broadcast over the batch*, and refused before training (:func:`reject_broadcast_parameters`), are the
trainable parameters whose output has no batch dimension and that the engine cannot separate: a
``relative_attention_bias`` without ``compute_bias`` (e.g. MPNet's), learned positional embeddings called with
a shape only (LED, Blenderbot, BlenderbotSmall, BigBird-Pegasus: ``forward(input_ids_shape, ...)``) and
sinusoidal tables made trainable. :func:`freeze_broadcast_parameters` freezes them (the pretrained tables are
kept as they are).

Example:
    >>> import torch
    >>> from transformers import T5Config, T5ForConditionalGeneration
    >>> model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
    ...                                             num_heads=2, decoder_start_token_id=0))
    >>> broadcast_parameters(model)  # T5's relative attention bias is trained and clipped per example
    []
    >>> class Encoder(torch.nn.Module):  # a relative position table without T5's compute_bias
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.relative_attention_bias = torch.nn.Embedding(8, 2)
    >>> freeze_broadcast_parameters(Encoder())
    ['relative_attention_bias.weight']
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from transformers import Seq2SeqTrainer

from hf_ewtune.clipping.relative_bias import TABLE_NAME, relative_bias_tables
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.trainer import DPTrainer

logger = logging.getLogger(__name__)

#: Attribute names of relative position tables (trained when their owner has ``compute_bias``, else broadcast).
BROADCAST_ATTRIBUTES = (TABLE_NAME,)
#: Class-name suffixes of position embeddings that may be broadcast over the batch: sinusoidal tables always,
#: learned ones when their ``forward`` takes a shape (:data:`SHAPE_ARGUMENTS`) rather than batched ids.
BROADCAST_CLASS_SUFFIXES = ("LearnedPositionalEmbedding", "SinusoidalPositionalEmbedding")
#: First ``forward`` argument of a learned positional embedding that sees only the input's shape.
SHAPE_ARGUMENTS = ("input_ids_shape", "input_shape")


def _is_broadcast_position_embedding(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    if name.endswith("SinusoidalPositionalEmbedding"):
        return True
    if not name.endswith("LearnedPositionalEmbedding"):
        return False
    params = list(inspect.signature(type(module).forward).parameters)
    return len(params) > 1 and params[1] in SHAPE_ARGUMENTS


def broadcast_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters of modules whose output is shared by every example of the batch
    in a way the clipping engine cannot separate (see the module docstring)."""
    supported = relative_bias_tables(model)[0]
    names = []
    for mod_name, module in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if (leaf in BROADCAST_ATTRIBUTES and module not in supported) or _is_broadcast_position_embedding(module):
            prefix = f"{mod_name}." if mod_name else ""
            names += [f"{prefix}{p}" for p, t in module.named_parameters(recurse=False) if t.requires_grad]
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
    """Raise before training when a trainable parameter is used broadcast over the batch (see the module docstring).

    Raises:
        PrivacyConfigError: naming the parameters and the fix.
    """
    names = broadcast_parameters(model)
    if names:
        raise PrivacyConfigError(
            f"trainable parameters {names} are used broadcast over the batch (position tables shared by every "
            "example, with no batch dimension the clipping engine can follow), so their per-example gradients "
            "cannot be separated for clipping. Freeze them first: "
            "hf_ewtune.seq2seq.freeze_broadcast_parameters(model) (LoRA adapters leave them frozen anyway). "
            "T5-style relative_attention_bias tables (with compute_bias) and BART's learned positions are "
            "trained and clipped per example."
        )


class DPSeq2SeqTrainer(DPTrainer, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with DP-SGD (``DPTrainer``'s arguments; one example = one source/target pair).

    Generation-based evaluation (``predict_with_generate``) is Seq2SeqTrainer's. T5's relative attention bias and
    BART's learned positions are trained (clipped per example); parameters still used broadcast over the batch
    (see the module docstring) are refused at construction, and so is a subclass overriding
    ``compute_loss`` (without ``compute_per_example_loss``) or ``training_step``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from hf_ewtune.trl.compat import reject_bypassing_overrides

        reject_bypassing_overrides(self, owner=DPSeq2SeqTrainer, loss_bases=(Seq2SeqTrainer,))
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            reject_broadcast_parameters(model)
        super().__init__(*args, **kwargs)
