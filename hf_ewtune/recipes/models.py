"""Model loading and LoRA wrapping shared by the recipes.

Offline names (``"all-MiniLM-L6-v2"``, ``"SmolLM2-135M"``) map to local assets through
:func:`hf_ewtune.data.resolve_model`; any other name or folder goes to ``from_pretrained`` as is
(the Hub when there is a network).

Example:
    >>> from hf_ewtune.recipes.models import lora_targets
    >>> from hf_ewtune.testing import tiny_bert
    >>> lora_targets(tiny_bert())
    (['query', 'value'], ['classifier'])
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_ewtune.cli_options import non_negative_int, positive_int

logger = logging.getLogger(__name__)

# (attention projections to adapt) in order of preference, by architecture naming convention.
_TARGET_SETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, ELECTRA, MiniLM
    ("q_proj", "v_proj"),  # Llama, SmolLM, Mistral, OPT, BART
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2
    ("query_key_value",),  # GPT-NeoX, Falcon
)
HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "classification_head")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (r=8, alpha=16, dropout 0 by default: dropout adds nothing under DP noise).

    ``last_layers`` adapts only the top that many transformer layers (``None``: all). Under DP this both
    shortens the backward pass (it stops at the lowest adapted layer) and puts the noise on fewer
    parameters.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank", "cli": {"type": positive_int}})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)", "cli": {"type": positive_int}})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (adds nothing under DP noise)"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "comma-separated module names for LoRA (default: guessed)",
        "cli": {"flag": "target", "type": str, "convert": lambda text: text.split(",")}})
    last_layers: int | None = field(default=None, metadata={
        "help": "adapt only the top N transformer layers; 0 = all",
        "cli": {"type": non_negative_int, "convert": lambda n: n or None}})


def lora_targets(model: Any) -> tuple[list[str], list[str]]:
    """Guess ``(target_modules, modules_to_save)`` for LoRA on a transformers model.

    Raises:
        ValueError: If no known attention-projection names are found (pass ``target_modules``).
    """
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in _TARGET_SETS:
        if all(n in leaf_names for n in names):
            targets = list(names)
            break
    else:
        raise ValueError(
            f"Cannot guess LoRA target modules for {type(model).__name__}: pass target_modules "
            "(e.g. --lora-target query,value)."
        )
    heads = [h for h in HEAD_NAMES if h in leaf_names]
    return targets, heads[:1]


def apply_lora(model: Any, *, settings: LoraSettings, task_type: str) -> Any:
    """Wrap ``model`` with PEFT LoRA; the classification head (if any) is trained fully via ``modules_to_save``.

    Args:
        model: A transformers model already on its final device (see dp-training.md §10).
        settings: LoRA hyper-parameters.
        task_type: ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
    """
    from peft import LoraConfig, get_peft_model

    targets, heads = lora_targets(model)
    if settings.target_modules:
        targets = list(settings.target_modules)
    layers = None
    if settings.last_layers is not None and settings.last_layers < 1:
        raise ValueError(f"last_layers must be a positive number of layers or None (all), got {settings.last_layers}")
    if settings.last_layers:
        depth = num_layers(model)
        layers = list(range(max(depth - settings.last_layers, 0), depth))
    config = LoraConfig(
        layers_to_transform=layers,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=heads if task_type == "SEQ_CLS" else None,
        task_type=task_type,
        fan_in_fan_out="c_attn" in targets,
    )
    return get_peft_model(model, config)


def to_training_device(model: Any, args: Any) -> Any:
    """``model`` on ``args.device``, the device the Trainer trains this process on (call it before PEFT wraps it).

    Under torchrun / ``accelerate launch`` that is ``cuda:LOCAL_RANK`` for each process, not ``"cuda"`` (the
    current device, cuda:0 in every process until the Trainer picks one): every rank would first put its copy of
    the model on GPU 0. On a CPU run the model is returned as it is.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from hf_ewtune.testing import tiny_bert
        >>> next(to_training_device(tiny_bert(), SimpleNamespace(device=torch.device("meta"))).parameters()).device
        device(type='meta')
    """
    device = args.device
    return model if device.type == "cpu" else model.to(device)


def num_layers(model: Any) -> int:
    """Number of transformer layers, from the model config.

    Raises:
        ValueError: If the config names no layer count (then ``last_layers`` cannot be used).
    """
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"Cannot tell how many layers {type(model).__name__} has: use all layers (last_layers=None).")


def load_pretrained(name: str, *, kind: str, num_labels: int | None = None) -> tuple[Any, Any, dict]:
    """Load ``(model, tokenizer, from_pretrained kwargs)`` by name.

    Args:
        name: Offline name, local folder or Hub id.
        kind: ``"seq_cls"`` or ``"causal_lm"``.
        num_labels: Number of classes for ``"seq_cls"``.

    Raises:
        OSError: With a hint when the model is neither local nor reachable.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hf_ewtune.data import resolve_model

    path, kwargs = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if kind == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        elif kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            raise ValueError(f"kind must be 'seq_cls' or 'causal_lm', got {kind!r}")
    except OSError as exc:
        raise OSError(
            f"Could not load model {name!r} ({exc}). Offline, use a local folder or one of the bundled "
            "models ('all-MiniLM-L6-v2', 'SmolLM2-135M'); online, unset HF_HUB_OFFLINE."
        ) from exc
    if "gguf_file" in kwargs:
        model = dequantized_copy(model)
    name_as_base_model(model, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, kwargs


def name_as_base_model(model: Any, name: str) -> None:
    """Record ``name`` (an offline name becomes its Hub id) as the model's origin, for PEFT and the model card.

    Loading from a local folder would otherwise put the machine's site-packages path into the adapter
    config and the card's ``base_model``.
    """
    from hf_ewtune.data import hub_id

    if os.path.isdir(name):
        return
    model.name_or_path = hub_id(name)
    if getattr(model, "config", None) is not None:
        model.config._name_or_path = hub_id(name)


def dequantized_copy(model: Any) -> Any:
    """A plain (trainable, saveable) copy of a GGUF-loaded model.

    transformers marks a GGUF-loaded model as quantized although its weights are dequantised to fp32, so
    ``Trainer`` refuses to train it and ``save_pretrained`` refuses to save it: rebuild it from its config
    (without the quantization config) and copy the state dict.
    """
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    auto = AutoModelForSequenceClassification if "ForSequenceClassification" in type(model).__name__ else AutoModelForCausalLM
    fresh = auto.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    real_missing = [k for k in missing if k not in getattr(fresh, "_tied_weights_keys", None) or []]
    if unexpected or (real_missing and not all("lm_head" in k for k in real_missing)):
        raise RuntimeError(f"Could not copy the GGUF model's weights: missing {real_missing}, unexpected {unexpected}")
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    return fresh


def save_model(*, trainer: Any, output_dir: str | Path, gguf: bool) -> None:
    """Save the trained model (the adapter for PEFT models) and the tokenizer into ``output_dir``.

    A GGUF-loaded full model cannot ``save_pretrained``: it is rebuilt from its config and the
    state dict copied over (safetensors, fp32).
    """
    from peft import PeftModel

    model = trainer.model
    if isinstance(model, PeftModel) or not gguf:
        with warnings.catch_warnings():
            # PEFT asks the Hub whether the base vocabulary changed; offline it cannot, and our LoRA never
            # targets or resizes embeddings, so its "assume the vocabulary was not modified" is right.
            warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
            trainer.save_model(str(output_dir))
    else:
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(str(output_dir))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(output_dir))
