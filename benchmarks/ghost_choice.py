"""Long sequences: is the engine's per-layer choice between ghost norm and instantiation the faster one?

For a Linear layer with input ``A [B, T, d_in]`` and output gradient ``G [B, T, d_out]`` the per-example squared
norm is computed either by the ghost identity ``<A A^T, G G^T>`` (time ~ B T^2 (d_in + d_out), memory ~ B T^2)
or by instantiating ``G^T A`` (time ~ B T d_in d_out, memory ~ B d_in d_out). ``hf_ewtune.clipping.linear.use_ghost``
picks ghost when ``2 T^2 < d_in d_out``. This script times both on random data for T = 128 ... 2048 and
Llama-like widths, and prints, per case, the faster one, the engine's pick, and both temporary sizes.

Usage:
    python benchmarks/ghost_choice.py            # B = 2, 3 repetitions
    python benchmarks/ghost_choice.py --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_ewtune.clipping.linear import use_ghost

WIDTHS = [(576, 576), (576, 1536), (2048, 2048), (2048, 8192)]


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seqs", default="128,256,512,1024,2048")
    a = ap.parse_args(argv)
    rows = []
    for t in (int(s) for s in a.seqs.split(",")):
        for d_in, d_out in WIDTHS:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(a.batch, t, d_in, generator=g)
            y = torch.randn(a.batch, t, d_out, generator=g)
            ghost = _time(lambda: (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(y, y.transpose(1, 2))).sum((1, 2)), a.reps)
            inst = _time(lambda: torch.bmm(y.transpose(1, 2), x).pow(2).sum((1, 2)), a.reps)
            faster = "ghost" if ghost < inst else "instantiate"
            pick = "ghost" if use_ghost(t, d_in, d_out) else "instantiate"
            rows.append({"T": t, "d_in": d_in, "d_out": d_out, "ghost_s": round(ghost, 4), "instantiate_s": round(inst, 4),
                         "faster": faster, "engine_pick": pick, "pick_is_faster": faster == pick,
                         "pick_over_best": round((ghost if pick == "ghost" else inst) / min(ghost, inst), 2),
                         "ghost_tmp_mb": round(2 * a.batch * t * t * 4 / 2**20, 1),
                         "instantiate_tmp_mb": round(a.batch * d_in * d_out * 4 / 2**20, 1)})
            r = rows[-1]
            print(f"T={t:5d} {d_in:5d}x{d_out:<5d} ghost {ghost:8.4f}s ({r['ghost_tmp_mb']:7.1f} MiB)  instantiate "
                  f"{inst:8.4f}s ({r['instantiate_tmp_mb']:7.1f} MiB)  faster={faster:11s} pick={pick:11s} "
                  f"pick/best={r['pick_over_best']:.2f}", flush=True)
    print(json.dumps({"batch": a.batch, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
