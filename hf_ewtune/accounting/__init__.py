"""Privacy accounting for DP-SGD with Poisson sampling: certified PLD/RDP and the Edgeworth estimate;
shuffled fixed-size batches get their own certified bound (:class:`ShuffledAccountant`, no amplification), and
random allocation (balls-in-bins) batches theirs (:class:`RandomAllocationAccountant`).

Every epsilon returned by ``get_epsilon`` is a CERTIFIED upper bound (dp-accounting PLD by default);
the Edgeworth (EW-Tune) number is available as an estimate and is labelled as such in reports.

Example:
    >>> from hf_ewtune.accounting import EdgeworthAccountant
    >>> acc = EdgeworthAccountant()
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    >>> report = acc.get_privacy_spent(delta=1e-5)
    >>> round(report.epsilon, 2), round(report.edgeworth_epsilon, 2)
    (1.83, 1.89)
"""

from __future__ import annotations

from .base import Accountant
from .calibration import CalibrationResult, calibrate, calibrate_noise_multiplier, edgeworth_sigma, steps_within_budget
from .certified import PLDAccountant, RDPAccountant
from .edgeworth_accountant import EdgeworthAccountant
from .registry import (
    ACCOUNTANTS,
    accountant_class,
    accountant_from_state,
    accountant_names,
    make_accountant,
    register_accountant,
    unregister_accountant,
)
from .random_allocation import RandomAllocationAccountant
from .report import PrivacyReport
from .saddle_point_accountant import SaddlePointAccountant
from .for_sampling import accountant_for_sampling
from .shuffled import ShuffledAccountant, gaussian_epsilon

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "CalibrationResult",
    "EdgeworthAccountant",
    "PLDAccountant",
    "PrivacyReport",
    "RDPAccountant",
    "RandomAllocationAccountant",
    "SaddlePointAccountant",
    "accountant_class",
    "ShuffledAccountant",
    "accountant_for_sampling",
    "accountant_from_state",
    "accountant_names",
    "calibrate",
    "calibrate_noise_multiplier",
    "edgeworth_sigma",
    "gaussian_epsilon",
    "make_accountant",
    "register_accountant",
    "unregister_accountant",
    "steps_within_budget",
]
