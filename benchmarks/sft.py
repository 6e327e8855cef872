"""Benchmark: one TRL ``SFTTrainer`` step against one ``DPSFTTrainer`` step (LoRA and full fine-tuning), CPU or GPU.

A Llama-shaped model with SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads, tied embeddings;
fewer layers and a smaller vocabulary unless ``--layers``/``--vocab`` say otherwise) and prompt/completion
records of ``--seq`` tokens (completion-only loss). Both trainers get the same collated batch; a step is
``training_step`` (forward + backward; + per-example clipping for DP) plus the optimizer step (+ noise for DP).
Peak memory: each mode runs in its own forked process (peak RSS of that process, or peak CUDA memory). Time:
one forked process holds both trainers and alternates them, one step each per round (the first round is a
warm-up); the time ratio is the median over rounds of the within-round ratio DP step / TRL step (the
machine's speed drifts, so only steps taken side by side are compared). Targets in issue 13: DP <= 1.15x time and <= 1.2x memory. The last
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


def _build_mode(mode: str, lora: bool, a: argparse.Namespace):
    """The trainer of ``mode`` ("trl" or "dp"), its model on the device and one collated batch."""
    import torch

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
    return trainer, trainer.model.to(device), batch, device


def _step(trainer, model, batch, device: str) -> float:
    """One ``training_step`` + optimizer step + ``zero_grad``; seconds."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.training_step(model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _memory(mode: str, lora: bool, a: argparse.Namespace) -> dict:
    """Forked child: peak memory of one mode (peak RSS, or peak CUDA memory) over two steps (the optimizer state
    exists from the first)."""
    import torch

    reset_peak_rss()
    trainer, model, batch, device = _build_mode(mode, lora, a)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        _step(trainer, model, batch, device)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"peak_mb": mem, "device": device,
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _interleaved_times(lora: bool, a: argparse.Namespace) -> dict:
    """Forked child: both trainers in one process, one step each per round (order alternating), first round warm-up.

    Returns the per-round step times of each mode (so a ratio compares steps taken seconds apart, under the same
    machine load)."""
    built = {mode: _build_mode(mode, lora, a) for mode in ("trl", "dp")}
    times: dict[str, list[float]] = {"trl": [], "dp": []}
    for rep in range(a.reps + 1):
        order = ("trl", "dp") if rep % 2 == 0 else ("dp", "trl")
        for mode in order:
            t = _step(*built[mode])
            if rep:  # the first round warms up
                times[mode].append(t)
    return times


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
    print(f"# sft.py {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  load {result['cpu_load']}", flush=True)
    for name, lora in (("lora", True), ("full", False)):
        trl_r = run_forked(_memory, "trl", lora, a)
        dp_r = run_forked(_memory, "dp", lora, a)
        times = run_forked(_interleaved_times, lora, a)
        for r, mode in ((trl_r, "trl"), (dp_r, "dp")):
            r["median_s"], r["times"] = median(times[mode]), times[mode]
        ratio = median([d / t for d, t in zip(times["dp"], times["trl"])])
        result[name] = {"trl": trl_r, "dp": dp_r, "time_ratio": ratio, "memory_ratio": dp_r["peak_mb"] / trl_r["peak_mb"]}
        print(f"{name:5s} TRL {trl_r['median_s']:.3f} s  DP {dp_r['median_s']:.3f} s  time x{result[name]['time_ratio']:.2f}"
              f"  memory {trl_r['peak_mb']:.0f} -> {dp_r['peak_mb']:.0f} MB (x{result[name]['memory_ratio']:.2f})")
    result["cpu_load_end"] = cpu_load()
    print(f"# load at end {result['cpu_load_end']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
