#!/usr/bin/env python
"""Worker of ``llm.py --fsdp``: DP full fine-tuning steps in the plain loop of ``hf_ewtune.distributed.fsdp``.

One process (``python llm_fsdp.py``): ``ClippingEngine`` + ``DPOptimizer(AdamW)`` on the whole global batch.
Under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPU): every decoder layer and the root are
``fully_shard``ed, each rank takes its ``1/N`` slice of the same global batch, the engine reduce-scatters the
clipped sums and each rank noises its own shard. Prints one JSON line (rank 0): median seconds per step
(``--warmup`` steps discarded; ranks synchronised by a barrier around each step) and peak RSS of rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import median, peak_rss_mb  # noqa: E402


def per_example_lm_loss(model, ids):
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits[:, :-1, :]
    target = ids[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return tok.view(target.shape).mean(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2, help="global batch (split across the processes)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.noise import DPOptimizer
    from llm import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = build_model(a.model, layers=a.layers, vocab=a.vocab, lora=False, ckpt=False)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-5), noise_multiplier=1.0, sensitivity=1.0,
                      expected_batch_size=a.batch, noise_seed=0)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(1234)
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} is not divisible by the {world} processes")
    per_rank = a.batch // world
    times = []
    for step in range(a.warmup + a.reps):
        ids = torch.randint(5, vocab, (a.batch, a.seq), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        engine.backward(per_example_lm_loss(model, ids))
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.barrier()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"world": world, "threads": torch.get_num_threads(), "median_s": median(times),
                          "times": times, "peak_rss_mb_rank0": peak_rss_mb()}), flush=True)
    engine.remove()
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
