"""Micro-benchmark: DP full fine-tuning of a Llama-shaped LM (RMSNorm through the torch.func fallback), CPU.

A closed-form RMSNorm rule (commit 22875c6) measured 1.006x faster than this fallback path only, so it was
removed: this script now reports the DP step's cost over a plain step for this architecture.

The model has SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads, tied embeddings) with fewer
layers and a smaller vocabulary so that a step takes about a second on 2 cores. Steps are interleaved in one
process (this CPU's speed drifts); each ratio is median(step) / median(plain step), where a step is forward
+ backward (+ per-example clipping for the DP step). The last line is a JSON object.

Usage:
    python benchmarks/llama.py                     # 4 layers, batch 8, 128 tokens, 5 repetitions
    python benchmarks/llama.py --layers 2 --reps 2 # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build(layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def per_example_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.clipping.functorch_fallback import FunctorchRule

    model = build(a.layers, a.vocab)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    engine = ClippingEngine(model, max_grad_norm=1.0)
    engine.remove()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(isinstance(engine._rules[m], FunctorchRule) for m in norms)

    def attach():  # the engine's hooks are on only for the DP step
        engine._handles = [m.register_forward_hook(engine._forward_hook, with_kwargs=True) for m in engine._rules]
        engine._handles.append(model.register_forward_pre_hook(engine._root_pre_hook, with_kwargs=True))

    def plain():
        per_example_loss(model, ids).mean().backward()

    def dp():
        attach()
        try:
            engine.backward(per_example_loss(model, ids))
        finally:
            engine.remove()

    steps = {"plain": plain, "dp": dp}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(a.reps + 1):  # the first round warms up
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Llama-shaped LM ({a.layers} layers, hidden 576, vocab {a.vocab}), full fine-tuning, batch {a.batch} x {a.seq} "
          f"tokens, {len(norms)} RMSNorm layers (torch.func fallback), {torch.get_num_threads()} threads, median of {a.reps}:")
    for k, v in med.items():
        print(f"  {k:6s} {v:7.3f} s   {v / med['plain']:.2f}x plain")
    result = {"dp_over_plain": round(med["dp"] / med["plain"], 4), "median_s": {k: round(v, 4) for k, v in med.items()}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
