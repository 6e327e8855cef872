"""Long sequences: is the engine's per-layer choice (keep, ghost norm or instantiation) the fastest one?

For a Linear layer with input ``A [B, T, d_in]`` and output gradient ``G [B, T, d_out]`` the engine needs the
per-example squared norms and then the clipped sum ``sum_i c_i G_i^T A_i``. Three ways, each timed here as
norms + clipped sum (the work that differs from a plain backward, plus the weight-gradient GEMM it replaces):

* ``keep``: instantiate ``G_i^T A_i`` (the same multiply-adds as the clipped-sum GEMM), its norms by one dot per
  example, the clipped sum as ``sum_i c_i g_i``; allowed when ``B d_in d_out <= B T (d_in + d_out)``
  (``hf_ewtune.clipping.linear.keep_fits``: no more memory than the ``A`` and ``G`` it lets go);
* ``ghost``: ``<A A^T, G G^T>`` from lower-triangle Gram blocks (~B T^2 (d_in + d_out)), then the GEMM;
* ``instantiate``: ``G_i^T A_i`` for the norms only, then the GEMM again.

The engine picks ``keep`` when it fits, else ghost when ``2 T^2 < d_in d_out`` (``use_ghost``), else
instantiation. Printed per case: the three times, the fastest allowed method, the engine's pick, pick/best.

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

from hf_ewtune.clipping._base import squared_norms
from hf_ewtune.clipping.linear import gram_blocks, gram_inner, keep_fits, use_ghost

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
            c = torch.rand(a.batch, generator=g)

            def gemm():
                return (y * c.view(-1, 1, 1)).reshape(-1, d_out).t() @ x.reshape(-1, d_in)

            def run_keep():
                pe = torch.bmm(y.transpose(1, 2), x)
                squared_norms(pe)
                return torch.tensordot(c, pe, dims=1)

            times = {"ghost": _time(lambda: (gram_inner(gram_blocks(x), gram_blocks(y)), gemm()), a.reps),
                     "instantiate": _time(lambda: (squared_norms(torch.bmm(y.transpose(1, 2), x)), gemm()), a.reps)}
            fits = keep_fits(t, d_in, d_out)
            if fits:
                times["keep"] = _time(run_keep, a.reps)
            best = min(times, key=times.get)
            pick = "keep" if fits else "ghost" if use_ghost(t, d_in, d_out) else "instantiate"
            rows.append({"T": t, "d_in": d_in, "d_out": d_out, **{f"{k}_s": round(v, 4) for k, v in times.items()},
                         "fastest": best, "engine_pick": pick, "pick_is_fastest": best == pick,
                         "pick_over_best": round(times[pick] / times[best], 2),
                         "ghost_tmp_mb": round(2 * a.batch * t * t * 4 / 2**20, 1),
                         "per_example_mb": round(a.batch * d_in * d_out * 4 / 2**20, 1),
                         "a_and_g_mb": round(a.batch * t * (d_in + d_out) * 4 / 2**20, 1)})
            r = rows[-1]
            shown = "  ".join(f"{k} {v:7.4f}s" for k, v in times.items())
            print(f"T={t:5d} {d_in:5d}x{d_out:<5d} {shown}  fastest={best:11s} pick={pick:11s} "
                  f"pick/best={r['pick_over_best']:.2f}  (per-example {r['per_example_mb']} MiB, A+G "
                  f"{r['a_and_g_mb']} MiB)", flush=True)
    print(json.dumps({"batch": a.batch, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
