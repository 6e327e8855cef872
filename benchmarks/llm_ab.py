#!/usr/bin/env python
"""Before/after in one run: the DPTrainer/Trainer step-time ratio of two checkouts of ``hf_ewtune``, interleaved.

Two worker processes, one per checkout (``--before DIR`` and ``--after DIR``, each a folder holding the
``hf_ewtune`` package; ``git archive REV hf_ewtune | tar -x -C DIR`` makes one), each build the same
``llm.py`` configuration (a plain ``Trainer`` and a ``DPTrainer`` on identically initialised copies of the
model) and wait. Per round the driver asks one worker, then the other (the first alternates), for one
optimizer step of each trainer (the first alternates too); a worker's DP/plain ratio pairs two steps taken
seconds apart, so load changes on a shared machine cancel out of it far better than between runs. Each step's
process CPU time (all threads) is reported beside the wall time: on an oversubscribed machine it tracks the
work done much more closely than the wall clock (``--threads 1`` makes it a pure count of work).
``--warmup`` rounds are discarded; the medians of the per-round ratios are printed with every round.

Usage::

    git archive main hf_ewtune | tar -x -C /tmp/before
    python benchmarks/llm_ab.py --before /tmp/before --after . --ft full --seq 512 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(argv: list[str]) -> None:
    """Build plain + DP trainers of one configuration; per line on stdin, one step of each; JSON per line out."""
    sys.path.insert(0, HERE)
    warnings.filterwarnings("ignore")
    import llm

    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 0
    argv = [x for i, x in enumerate(argv) if x != "--threads" and (i == 0 or argv[i - 1] != "--threads")]
    a = llm.parse_args(argv)
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)

    transformers.logging.set_verbosity_error()
    cfg = llm.Config(a.models[0], a.ft[0], a.seq[0], a.ckpt[0], a)
    rounds = a.warmup + a.reps
    with tempfile.TemporaryDirectory() as tmp:
        runners = {m: llm.make_runner(m, cfg, rounds + 1, os.path.join(tmp, m)) for m in ("plain", "dp")}
        import hf_ewtune

        print(json.dumps({"ready": os.path.dirname(os.path.dirname(hf_ewtune.__file__))}), flush=True)
        for line in sys.stdin:
            order = ("plain", "dp") if int(line) % 2 == 0 else ("dp", "plain")
            times = {}
            for m in order:
                cpu = time.process_time()
                times[m] = runners[m].step()
                times[m + "_cpu"] = time.process_time() - cpu  # all threads' CPU seconds: less load-sensitive
            print(json.dumps(times), flush=True)
        for r in runners.values():
            r.close()


def _read_json(proc: subprocess.Popen) -> dict:
    """The worker's next JSON line (other output, e.g. DPTrainer's announcement, is passed through to stderr)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {proc.wait()}")
        if line.startswith("{"):
            return json.loads(line)
        print(line.rstrip(), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="folder holding the 'before' hf_ewtune package")
    p.add_argument("--after", required=True, help="folder holding the 'after' hf_ewtune package")
    p.add_argument("--models", default="llama1b")
    p.add_argument("--ft", default="full", help="lora or full")
    p.add_argument("--seq", default="512")
    p.add_argument("--ckpt", default="off")
    p.add_argument("--batch", default="2")
    p.add_argument("--layers", default="1")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    a = p.parse_args()
    llm_args = ["--models", a.models, "--ft", a.ft, "--seq", a.seq, "--ckpt", a.ckpt, "--batch", a.batch,
                "--layers", a.layers, "--warmup", str(a.warmup), "--reps", str(a.reps)]
    if a.threads:
        llm_args += ["--threads", str(a.threads)]
    procs = {}
    for name, folder in (("before", a.before), ("after", a.after)):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(folder), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *llm_args], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        ready = _read_json(proc)
        print(f"# {name}: hf_ewtune from {ready['ready']}", flush=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} load {os.getloadavg()[0]:.2f}; {a.models}/{a.ft}/T{a.seq}/"
          f"ckpt-{a.ckpt}/B{a.batch}", flush=True)
    ratios: dict[str, list[float]] = {n: [] for n in procs}
    cpu_ratios: dict[str, list[float]] = {n: [] for n in procs}
    names = list(procs)
    for r in range(a.warmup + a.reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            proc = procs[name]
            proc.stdin.write(f"{r}\n")
            proc.stdin.flush()
            t = _read_json(proc)
            ratio, cpu_ratio = t["dp"] / t["plain"], t["dp_cpu"] / t["plain_cpu"]
            if r >= a.warmup:
                ratios[name].append(ratio)
                cpu_ratios[name].append(cpu_ratio)
            print(f"round {r + 1} {name:<6} plain {t['plain']:7.3f} s  dp {t['dp']:7.3f} s  dp/plain {ratio:.3f}  | "
                  f"CPU s: plain {t['plain_cpu']:7.3f}  dp {t['dp_cpu']:7.3f}  dp/plain {cpu_ratio:.3f}"
                  + ("  (warm-up)" if r < a.warmup else ""), flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    med = {n: _median(v) for n, v in ratios.items()}
    cpu_med = {n: _median(v) for n, v in cpu_ratios.items()}
    print(f"# median dp/plain, wall: before {med['before']:.3f}, after {med['after']:.3f}; CPU time: before "
          f"{cpu_med['before']:.3f}, after {cpu_med['after']:.3f}; load {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ratios": ratios, "median": med, "cpu_ratios": cpu_ratios, "cpu_median": cpu_med}))


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
