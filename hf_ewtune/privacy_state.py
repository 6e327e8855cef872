"""Read and write ``_privacy_state.json``: the accountant history and privacy settings of a run.

The file is written into every checkpoint folder (``output_dir/checkpoint-N``) and into ``output_dir`` on
``save_model``. It holds the accountant's ``state_dict`` (its (q, sigma, steps) segments), delta, the
target, sigma, the clipping norm and style, the sample rate and expected batch size, whether Poisson
sampling was really used, steps, epochs, world size, the calibration record, the accountant name and the
library versions. It NEVER holds random-number-generator state (checkpoints are often published).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = save_privacy_state(d, {"steps": 3, "accountant": "edgeworth"})
    >>> load_privacy_state(d)["steps"]
    3
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hf_ewtune.errors import PrivacyStateError

PRIVACY_STATE_NAME = "_privacy_state.json"
FORMAT_VERSION = 1


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _json_safe(obj.item())
        except Exception:  # pragma: no cover - defensive
            return str(obj)
    return obj


def save_privacy_state(path_dir: str, state: dict[str, Any]) -> str:
    """Write ``state`` to ``path_dir/_privacy_state.json`` (atomically) and return the file path.

    Args:
        path_dir: A checkpoint or output folder (created if missing).
        state: JSON-serialisable dict (non-finite floats are written as strings ``"inf"``).
    """
    os.makedirs(path_dir, exist_ok=True)
    path = os.path.join(path_dir, PRIVACY_STATE_NAME)
    payload = {"format_version": FORMAT_VERSION, **_json_safe(state)}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_privacy_state(path_dir: str) -> dict[str, Any]:
    """Read ``path_dir/_privacy_state.json``.

    Raises:
        PrivacyStateError: if the file is missing or unreadable — resuming without it would silently
            restart the privacy accounting from zero.
    """
    path = os.path.join(path_dir, PRIVACY_STATE_NAME)
    if not os.path.isfile(path):
        raise PrivacyStateError(
            f"{path_dir!r} has no {PRIVACY_STATE_NAME}: it was not written by a DPTrainer run (or the file was "
            "removed), so the privacy already spent is unknown. Resume from a checkpoint saved by DPTrainer, or "
            "start a new run without resume_from_checkpoint (its epsilon then does NOT cover the earlier training)."
        )
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise PrivacyStateError(f"cannot read {path!r}: {exc}. The file is corrupt; restore it from a backup.") from exc
    if not isinstance(state, dict) or "accountant_state" not in state and "steps" not in state:
        raise PrivacyStateError(f"{path!r} does not look like a privacy state (no accountant_state / steps).")
    return state
