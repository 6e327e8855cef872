"""Input checks shared by the accountants and calibration: the ones of :mod:`hf_ewtune.checks` (one definition)."""

from __future__ import annotations

from hf_ewtune.checks import (  # noqa: F401  (re-exported for the accounting modules)
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
)
