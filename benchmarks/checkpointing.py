"""Gradient checkpointing under DP: peak memory and step time, Llama-shaped LM at sequence 1024, CPU.

Four configurations, each in its own forked child (``_common.run_forked``) so peak memories do not mix:
``plain`` (mean loss, ``backward()``) and ``dp`` (per-example losses, ``ClippingEngine.backward``), each with
checkpointing off and on (Hugging Face ``activation_checkpointing_enable``, non-reentrant, the default; add
``--reentrant`` for the reentrant mode). A child builds the model, resets the kernel's peak-RSS counter,
runs ``--steps`` forward+backward steps after one warm-up step and reports the peak RSS added over the loaded
model (``VmHWM - VmRSS before``) and the median step time. glibc is told to ``mmap`` every tensor of 64 KiB or
more (``release_freed_memory_immediately``) so the RSS follows live tensors. The children run one after the
other, so time ratios carry this machine's drift (it is shared and loaded): compare memory first.

Usage:
    python benchmarks/checkpointing.py                      # 2 layers, batch 2 x 1024 tokens, 2 steps
    python benchmarks/checkpointing.py --layers 4 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import current_rss_mb, peak_rss_mb, release_freed_memory_immediately, reset_peak_rss, run_forked  # noqa: E402


def _probe(mode: str, ckpt: bool, reentrant: bool, layers: int, batch: int, seq: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from llama import build

    release_freed_memory_immediately()
    model = build(layers, 8192)
    if ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    engine = None
    if mode == "dp":
        from hf_ewtune.clipping import ClippingEngine

        engine = ClippingEngine(model, max_grad_norm=1.0)
    ids = torch.randint(0, 8192, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        logits = model(input_ids=ids).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
        if engine is None:
            losses.mean().backward()
        else:
            engine.backward(losses)

    model.zero_grad(set_to_none=False)
    step()  # warm-up (and gradients allocated)
    base = current_rss_mb()
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_added_mb": round(peak_rss_mb() - base, 1), "median_s": round(statistics.median(times), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reentrant", action="store_true")
    a = ap.parse_args(argv)
    results = {}
    for mode in ("plain", "dp"):
        for ckpt in (False, True):
            key = f"{mode}_{'ckpt' if ckpt else 'no_ckpt'}"
            results[key] = run_forked(_probe, mode, ckpt, a.reentrant, a.layers, a.batch, a.seq, a.steps)
    print(f"Llama-shaped LM ({a.layers} layers, hidden 576, MLP 1536, vocab 8192), full fine-tuning, batch {a.batch} x "
          f"{a.seq} tokens, checkpointing {'reentrant' if a.reentrant else 'non-reentrant'}, {a.steps} timed steps:")
    for key, r in results.items():
        print(f"  {key:14s} peak added {r['peak_added_mb']:8.1f} MiB   step {r['median_s']:7.3f} s")
    for mode in ("plain", "dp"):
        on, off = results[f"{mode}_ckpt"], results[f"{mode}_no_ckpt"]
        results[f"{mode}_ckpt_memory_ratio"] = round(on["peak_added_mb"] / max(off["peak_added_mb"], 1e-9), 3)
        results[f"{mode}_ckpt_time_ratio"] = round(on["median_s"] / off["median_s"], 3)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
