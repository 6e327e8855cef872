"""Split a Hugging Face transformer into a frozen *bottom* (data owner) and a trainable *top* (model owner).

``split_layer=k``: ``k == 0`` ships only the word-embedding table; ``k >= 1`` ships the embeddings plus the
first ``k`` blocks. The top is the original model class with its first ``k`` blocks removed and its input
stage replaced so that it consumes the bottom's (privatized) output through ``inputs_embeds``; it therefore
keeps working with PEFT, ``transformers.Trainer`` and ``model(inputs_embeds=..., attention_mask=..., labels=...)``.

Supported families: BERT/RoBERTa-like encoders (``<base>.embeddings`` + ``<base>.encoder.layer``),
GPT-2-like decoders (``transformer.wte/wpe/drop/h/ln_f``) and Llama-like decoders
(``model.embed_tokens/layers/norm`` with rotary positions).

Example:
    >>> import torch
    >>> from hf_ewtune.testing import tiny_bert
    >>> from hf_ewtune.sap import split_model
    >>> model = tiny_bert(vocab_size=50).eval()
    >>> bottom, top = split_model(model, split_layer=1)
    >>> ids = torch.tensor([[2, 7, 9, 3]]); mask = torch.ones_like(ids)
    >>> h = bottom(input_ids=ids, attention_mask=mask)
    >>> torch.allclose(top(inputs_embeds=h, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from hf_ewtune.errors import PrivacyConfigError, UnsupportedModuleError

logger = logging.getLogger(__name__)

__all__ = ["SAPBottom", "split_model", "detect_family"]


@dataclass(frozen=True)
class _Layout:
    family: str  # "encoder" | "gpt2" | "llama"
    base_attr: str  # attribute holding the backbone on the task model ("" when the model is the backbone)


def _backbone(model: nn.Module, layout: _Layout) -> nn.Module:
    return getattr(model, layout.base_attr) if layout.base_attr else model


def detect_family(model: nn.Module) -> _Layout:
    """Find the backbone of ``model`` and classify it as ``encoder``, ``gpt2`` or ``llama``.

    Raises:
        UnsupportedModuleError: when the architecture is none of the supported layouts.
    """
    candidates = [getattr(model, "base_model_prefix", ""), "bert", "roberta", "transformer", "model", ""]
    for attr in candidates:
        base = model if attr == "" else getattr(model, attr, None)
        if not isinstance(base, nn.Module):
            continue
        if hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"):
            return _Layout("encoder", attr)
        if all(hasattr(base, a) for a in ("wte", "wpe", "h", "ln_f")):
            return _Layout("gpt2", attr)
        if all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")):
            return _Layout("llama", attr)
    raise UnsupportedModuleError(
        f"split_model: unsupported architecture {type(model).__name__}; supported are BERT/RoBERTa-like encoders "
        "(embeddings + encoder.layer), GPT-2-like (wte/wpe/h/ln_f) and Llama-like (embed_tokens/layers/norm) decoders."
    )


def _num_blocks(base: nn.Module, family: str) -> int:
    if family == "encoder":
        return len(base.encoder.layer)
    if family == "gpt2":
        return len(base.h)
    return len(base.layers)


class _PassThroughEmbeddings(nn.Module):
    """Stands in for ``BertEmbeddings`` in the top model: returns ``inputs_embeds`` unchanged.

    ``word_embeddings`` is kept (unused in forward) so that ``get_input_embeddings()`` still works.
    """

    def __init__(self, word_embeddings: nn.Module):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                past_key_values_length: int = 0, **kwargs):  # noqa: D401 - mirrors BertEmbeddings
        if inputs_embeds is None:
            raise ValueError("The SAP top model needs inputs_embeds (the privatized bottom output), not input_ids.")
        return inputs_embeds


class _ZeroPositions(nn.Module):
    """Stands in for GPT-2's ``wpe`` in the top model: positions were already added by the bottom."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, dtype=torch.float32, device=position_ids.device)


class SAPBottom(nn.Module):
    """The data owner's frozen part: ``forward(input_ids, attention_mask, ...) -> hidden [B, T, d]``.

    For ``split_layer == 0`` this is the word-embedding lookup only (no positions, token types or LayerNorm);
    otherwise the backbone's embeddings plus the first ``split_layer`` blocks, without any final norm.

    Example:
        >>> import torch
        >>> from hf_ewtune.testing import tiny_gpt2
        >>> from hf_ewtune.sap import split_model
        >>> bottom, _ = split_model(tiny_gpt2(vocab_size=50), split_layer=0)
        >>> bottom(input_ids=torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 32])
    """

    def __init__(self, module: nn.Module, *, family: str, split_layer: int):
        super().__init__()
        self.module = module
        self.family = family
        self.split_layer = split_layer
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The word-embedding table ``[V, d]`` (what a k=0 nearest-neighbour attacker inverts against)."""
        if self.split_layer == 0:
            return self.module.weight
        return self.module.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return int(self.embedding_matrix.shape[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.split_layer == 0:
            return self.module(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.module(**kwargs).last_hidden_state


def split_model(model: nn.Module, *, split_layer: int) -> tuple[SAPBottom, nn.Module]:
    """Split ``model`` at block ``split_layer`` into ``(bottom, top)``; ``model`` itself is left untouched.

    Args:
        model: A ``transformers`` model (task head included, e.g. ``BertForSequenceClassification``,
            ``GPT2LMHeadModel``, ``LlamaForCausalLM``) or a bare backbone.
        split_layer: Number of transformer blocks that run on the data owner's side (0 = word embeddings only).

    Returns:
        ``bottom`` (:class:`SAPBottom`, all parameters frozen, in eval mode) and ``top`` (a copy of ``model``
        whose first ``split_layer`` blocks are removed; call it with ``inputs_embeds=`` the bottom output).

    Raises:
        PrivacyConfigError: if ``split_layer`` is negative or not smaller than the number of blocks.
        UnsupportedModuleError: for an unsupported architecture.

    Notes:
        * Use **right padding** for encoders (RoBERTa's ``inputs_embeds`` path does not skip padding in its
          position ids) and pass ``position_ids = cumsum(mask) - 1`` to both sides for left-padded decoders.
        * GPT-2's ``lm_head`` is tied to ``wte``; the top keeps ``wte`` (unused in forward) for that reason.

    Example:
        >>> from hf_ewtune.testing import tiny_gpt2
        >>> bottom, top = split_model(tiny_gpt2(vocab_size=50), split_layer=1)
        >>> len(top.transformer.h)
        1
    """
    if not isinstance(split_layer, int) or split_layer < 0:
        raise PrivacyConfigError(f"split_layer must be an int >= 0, got {split_layer!r}.")
    layout = detect_family(model)
    n_blocks = _num_blocks(_backbone(model, layout), layout.family)
    if split_layer >= n_blocks:
        raise PrivacyConfigError(
            f"split_layer={split_layer} leaves no block for the model owner (the model has {n_blocks}); "
            f"choose split_layer in [0, {n_blocks - 1}]."
        )
    k = split_layer
    top = copy.deepcopy(model)
    tbase = _backbone(top, layout)
    if hasattr(top.config, "use_cache"):
        top.config.use_cache = False

    if k == 0:
        emb = copy.deepcopy(_backbone(model, layout).get_input_embeddings())
        bottom = SAPBottom(emb, family=layout.family, split_layer=0)
    else:
        bbase = copy.deepcopy(_backbone(model, layout))
        if layout.family == "encoder":
            bbase.encoder.layer = bbase.encoder.layer[:k]
            if getattr(bbase, "pooler", None) is not None:
                bbase.pooler = None
            tbase.embeddings = _PassThroughEmbeddings(tbase.embeddings.word_embeddings)
            tbase.encoder.layer = tbase.encoder.layer[k:]
        elif layout.family == "gpt2":
            bbase.h = bbase.h[:k]
            bbase.ln_f = nn.Identity()
            tbase.wpe = _ZeroPositions(tbase.embed_dim)
            tbase.drop = nn.Identity()
            tbase.h = tbase.h[k:]
        else:  # llama
            bbase.layers = bbase.layers[:k]
            bbase.norm = nn.Identity()
            tbase.layers = tbase.layers[k:]
        bbase.config.use_cache = False
        bottom = SAPBottom(bbase, family=layout.family, split_layer=k)
    bottom.eval()
    top.sap_split_layer = k  # informational
    logger.debug("split %s at k=%d (%s)", type(model).__name__, k, layout.family)
    return bottom, top
