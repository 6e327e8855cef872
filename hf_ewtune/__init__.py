"""hf_ewtune: differentially private fine-tuning of Hugging Face models.

Every epsilon this library enforces or publishes is a certified upper bound (by default from
``dp-accounting``'s PLD accountant); the Edgeworth estimate of EW-Tune is computed and shown beside it.

Heavy imports (torch, transformers) are deferred until the attribute is used, so that
``hf_ewtune.accounting`` and the command line stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DPTrainer": "hf_ewtune.trainer",
    "PrivacyArguments": "hf_ewtune.arguments",
    "DPTrainingArguments": "hf_ewtune.training_arguments",
    "PrivacyCallback": "hf_ewtune.callbacks",
    "EdgeworthAccountant": "hf_ewtune.accounting",
    "PLDAccountant": "hf_ewtune.accounting",
    "RDPAccountant": "hf_ewtune.accounting",
    "calibrate_noise_multiplier": "hf_ewtune.accounting",
    "register_accountant": "hf_ewtune.accounting",
    "register_clipping_rule": "hf_ewtune.clipping",
    "check_per_example_gradients": "hf_ewtune.testing",
    "add_privacy_to_model_card": "hf_ewtune.model_card",
    "read_privacy_metadata": "hf_ewtune.model_card",
    "DChiPrivatizer": "hf_ewtune.sap",
    "CTIAllocator": "hf_ewtune.sap",
    "split_model": "hf_ewtune.sap",
    "SAPCustomer": "hf_ewtune.sap",
    "SAPVendor": "hf_ewtune.sap",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_ewtune' has no attribute {name!r}")
