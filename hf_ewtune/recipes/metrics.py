"""Offline metrics for the recipes (no ``evaluate`` download needed).

Example:
    >>> import numpy as np
    >>> from hf_ewtune.recipes.metrics import accuracy_metrics
    >>> accuracy_metrics((np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])))
    {'accuracy': 0.5}
"""

from __future__ import annotations

from typing import Any


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: accuracy of the arg-max of the logits.

    Args:
        eval_pred: An ``EvalPrediction`` or a ``(logits, labels)`` tuple.

    Returns:
        ``{"accuracy": float}``.
    """
    import numpy as np

    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    preds = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    if labels.size == 0:
        return {"accuracy": float("nan")}
    return {"accuracy": float((preds == labels).mean())}
