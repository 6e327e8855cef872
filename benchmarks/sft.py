"""Benchmark: one TRL ``SFTTrainer`` step against one ``DPSFTTrainer`` step (LoRA and full fine-tuning), CPU or GPU.

A Llama-shaped model with SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads, tied embeddings;
fewer layers and a smaller vocabulary unless ``--layers``/``--vocab`` say otherwise) and prompt/completion
records of ``--seq`` tokens (completion-only loss). Both trainers get the same collated batch; a step is
``training_step`` (forward + backward; + per-example clipping for DP) plus the optimizer step (+ noise for DP).
Each mode runs in a forked process (peak memory = peak RSS of that process, or peak CUDA memory); time ratios
are median(DP step) / median(TRL step). Targets in issue 13: DP <= 1.15x time and <= 1.2x memory. The last
line is a JSON object.

Usage:
    python benchmarks/sft.py                 # 2 layers, batch 8, 256 tokens, 5 repetitions
    python benchmarks/sft.py --quick         # 1 layer, batch 2, 64 tokens, 2 repetitions (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_load, median, peak_rss_mb, reset_peak_rss, run_forked  # noqa: E402


def _build(layers: int, vocab: int, lora: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=4096, tie_word_embeddings=True, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=0, eos_token_id=0))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def _tokenizer():
    from hf_ewtune.testing import tiny_tokenizer

    return tiny_tokenizer(kind="bpe")


def _dataset(n: int, seq: int):
    import random

    from datasets import Dataset

    rng = random.Random(0)
    words = ["film", "plot", "warm", "dull", "acted", "script", "best", "mess", "year", "funny"]
    prompt_chars, completion_chars = (seq * 3) // 4, seq // 4  # byte-level tokenizer: one token per character
    def text(k):
        out = ""
        while len(out) < k:
            out += rng.choice(words) + " "
        return out[:k]
    return Dataset.from_dict({"prompt": [text(prompt_chars) for _ in range(n)],
                              "completion": [text(completion_chars) for _ in range(n)]})


def _one_mode(mode: str, lora: bool, a: argparse.Namespace) -> dict:
    import torch

    reset_peak_rss()
    tok = _tokenizer()
    model = _build(a.layers, max(a.vocab, len(tok)), lora)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(output_dir=f"/tmp/bench-sft-{mode}", per_device_train_batch_size=a.batch, max_steps=10,
                  report_to="none", save_strategy="no", disable_tqdm=True, max_length=a.seq + 8,
                  gradient_checkpointing=False, use_cpu=device == "cpu", learning_rate=1e-4)
    data = _dataset(max(4 * a.batch, 32), a.seq)
    if mode == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tok)
    else:
        from hf_ewtune.trl import DPSFTConfig, DPSFTTrainer

        trainer = DPSFTTrainer(model=model, args=DPSFTConfig(**common, noise_multiplier=1.0, noise_seed=0),
                               train_dataset=data, processing_class=tok)
    ds = trainer._remove_unused_columns(trainer.train_dataset, description="training")
    batch = trainer.data_collator([ds[i] for i in range(a.batch)])
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark bypasses
    model = trainer.model.to(device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for rep in range(a.reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.training_step(model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if rep:  # the first step warms up
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"median_s": median(times), "peak_mb": mem, "device": device,
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.batch, a.seq, a.reps, a.vocab = 1, 2, 64, 2, 512
    result: dict = {"settings": vars(a), "cpu_load": cpu_load()}
    for name, lora in (("lora", True), ("full", False)):
        trl_r = run_forked(_one_mode, "trl", lora, a)
        dp_r = run_forked(_one_mode, "dp", lora, a)
        result[name] = {"trl": trl_r, "dp": dp_r, "time_ratio": dp_r["median_s"] / trl_r["median_s"],
                        "memory_ratio": dp_r["peak_mb"] / trl_r["peak_mb"]}
        print(f"{name:5s} TRL {trl_r['median_s']:.3f} s  DP {dp_r['median_s']:.3f} s  time x{result[name]['time_ratio']:.2f}"
              f"  memory {trl_r['peak_mb']:.0f} -> {dp_r['peak_mb']:.0f} MB (x{result[name]['memory_ratio']:.2f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
