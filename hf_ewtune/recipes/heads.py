"""The classifier head of the text-classification recipe: which one, at what learning rate, how to reload it.

``pooling="auto"`` uses the pooling a sentence-transformers checkpoint declares (mean and L2 norm for
all-MiniLM-L6-v2: a :class:`~hf_ewtune.recipes.pooling.PooledSequenceClassifier`), else the model's own
``AutoModelForSequenceClassification`` head. A pooled head starts at zero and trains at its own, larger
learning rate. Runs with a pooled head record it in ``pooled_head.json`` and say on their card how to
reload them.

Example:
    >>> from hf_ewtune.recipes.heads import head_optimizer
    >>> from hf_ewtune.testing import tiny_bert
    >>> head_optimizer(tiny_bert(), learning_rate=5e-3, head_learning_rate=None) is None  # own head: Trainer's AdamW
    True
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hf_ewtune.recipes.models import HEAD_NAMES, load_pretrained, name_as_base_model

# torch-free at import (the command line builds its parser from these modules): pooling.py is imported lazily.

logger = logging.getLogger(__name__)

POOLED_HEAD_LEARNING_RATE = 5e-2
HEAD_CHOICES = ("auto", "model", "mean", "cls")  # "mean"/"cls": pooling.POOLINGS

_LOAD_SECTION = """
## How to load

The classifier reads the {pooling}-pooled{norm} sentence vector of the base model (the pooling its
sentence-transformers checkpoint was trained with), not a `[CLS]` head, so rebuild it with hf_ewtune
(`pooled_head.json` says how):

```python
from hf_ewtune.recipes.pooling import load_pooled_classifier

model = load_pooled_classifier("path/to/this/folder-or-repo-id")  # LoRA merged, eval mode
logits = model(**tokenizer(["a gripping film"], return_tensors="pt")).logits
```
"""


def load_classifier(name: str, *, num_labels: int, pooling: str = "auto") -> tuple[Any, Any, bool]:
    """``(model, tokenizer, loaded_from_gguf)`` for model ``name`` with the head ``pooling`` asks for.

    Args:
        name: Offline name, local folder or Hub id.
        num_labels: Number of classes.
        pooling: ``"auto"``, ``"model"`` (the model's own head), ``"mean"`` or ``"cls"``.

    Raises:
        ValueError: For an unknown ``pooling``.
    """
    from hf_ewtune.data import resolve_model
    from hf_ewtune.recipes.pooling import build_pooled_classifier, sentence_transformers_pooling

    if pooling not in HEAD_CHOICES:
        raise ValueError(f"pooling must be one of {HEAD_CHOICES}, got {pooling!r}")
    normalize = False
    if pooling != "model":
        path, kwargs = resolve_model(name)
        declared = sentence_transformers_pooling(path) if "gguf_file" not in kwargs else None
        if pooling == "auto":
            pooling = declared[0] if declared else "model"
        normalize = bool(declared and declared[1])
    if pooling == "model":
        model, tokenizer, kwargs = load_pretrained(name, kind="seq_cls", num_labels=num_labels)
        return model, tokenizer, "gguf_file" in kwargs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = build_pooled_classifier(path, num_labels=num_labels, pooling=pooling, normalize=normalize, **kwargs)
    name_as_base_model(model, name)
    logger.info("Classifier head: %s pooling%s (from %s)", pooling, " + L2 normalisation" if normalize else "", name)
    return model, tokenizer, False


def head_optimizer(model: Any, *, learning_rate: float, head_learning_rate: float | None) -> Any:
    """AdamW with the head at its own learning rate; ``None`` when both rates are equal (the Trainer builds its own).

    Args:
        model: The (possibly PEFT-wrapped) classifier.
        learning_rate: Rate of every trainable parameter outside the head (LoRA adapters, encoder).
        head_learning_rate: Rate of the head; ``None``: :data:`POOLED_HEAD_LEARNING_RATE` for a pooled
            head, else ``learning_rate``.

    Raises:
        ValueError: If a separate head rate is asked for but the model has no trainable head.
    """
    from hf_ewtune.recipes.pooling import PooledSequenceClassifier

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if head_learning_rate is None:
        head_learning_rate = POOLED_HEAD_LEARNING_RATE if isinstance(base, PooledSequenceClassifier) else learning_rate
    if head_learning_rate == learning_rate:
        return None
    import torch

    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if any(h in name.split(".") for h in HEAD_NAMES) else body).append(param)
    if not head:
        raise ValueError("head_learning_rate is set but the model has no trainable 'classifier'/'score' head.")
    # body first: the Trainer logs the first group's learning rate, which is then --learning-rate
    groups = ([{"params": body, "lr": learning_rate}] if body else []) + [{"params": head, "lr": head_learning_rate}]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)


def write_head_settings(model: Any, *, base_model: str | None, output_dir: Path) -> None:
    """Write ``pooled_head.json`` for a pooled head (nothing for the model's own head).

    ``base_model`` is the name :func:`~hf_ewtune.recipes.pooling.load_pooled_classifier` reloads from
    (``None`` for a model it cannot rebuild by name, e.g. a smoke run's random tiny BERT).
    """
    from hf_ewtune.recipes.pooling import HEAD_FILE, PooledSequenceClassifier

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, PooledSequenceClassifier):
        settings = dict(base.head_settings(), base_model=base_model)
        (Path(output_dir) / HEAD_FILE).write_text(json.dumps(settings, indent=2))


def add_load_section(card: Path, output_dir: Path) -> None:
    """Append a "How to load" section to the model card of a run with a pooled head."""
    from hf_ewtune.recipes.pooling import HEAD_FILE

    head_file = Path(output_dir) / HEAD_FILE
    if not head_file.exists():
        return
    head = json.loads(head_file.read_text())
    with Path(card).open("a", encoding="utf-8") as fh:
        fh.write(_LOAD_SECTION.format(pooling=head["pooling"], norm=", L2-normalised" if head["normalize"] else ""))
