"""Reusable main-job logic: the recipes behind ``hf-ewtune train`` and the examples.

Example:
    >>> from hf_ewtune.recipes import TextClassificationConfig
    >>> TextClassificationConfig().model
    'all-MiniLM-L6-v2'
"""

from hf_ewtune.recipes.causal_lm import CausalLMConfig, run_causal_lm
from hf_ewtune.recipes.models import LoraSettings
from hf_ewtune.recipes.sft import SFTRecipeConfig, run_sft
from hf_ewtune.recipes.text_classification import TextClassificationConfig, run_text_classification
from hf_ewtune.recipes.training import PrivacySettings, RunResult

__all__ = ["CausalLMConfig", "LoraSettings", "PrivacySettings", "RunResult", "SFTRecipeConfig", "TextClassificationConfig",
           "run_causal_lm", "run_sft", "run_text_classification"]
