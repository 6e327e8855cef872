"""The one JSON-safe conversion used for privacy states, reports, calibration records and card metadata.

JSON (and the Hub's card metadata) has no ``inf``/``nan``: non-finite floats become the strings
``"inf"``, ``"-inf"``, ``"nan"`` (``float("inf")`` parses them back). Tuples become lists, mapping keys
strings, and numpy / torch scalars plain Python numbers.

Example:
    >>> json_safe({"epsilon": float("inf"), "history": [(1.0, 0.01, 3)]})
    {'epsilon': 'inf', 'history': [[1.0, 0.01, 3]]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by strings, recursively (scalars are returned converted)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if not isinstance(value, (str, bytes, int, bool)) and hasattr(value, "item") and callable(value.item):
        try:  # numpy / torch scalars
            return json_safe(value.item())
        except Exception:  # pragma: no cover - defensive (e.g. a multi-element array)
            return str(value)
    return value


__all__ = ["json_safe"]
