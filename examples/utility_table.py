#!/usr/bin/env python
"""The README's utility table: the main job at several privacy levels, on the offline sentiment data.

Runs ``hf-ewtune train`` (same model, data and optimisation settings) non-privately and at each target
epsilon, one process per row, then prints a markdown table: test accuracy, the certified epsilon (and
what certified it), the Edgeworth estimate, the noise multiplier, wall time, and the exact command.

Wall times depend on the machine and on what else runs on it: quote them with the core count and load.

Examples:
    python examples/utility_table.py                          # non-private, ε = 8, 3, 1 (about 4 x 10 min on 2 cores)
    python examples/utility_table.py --epsilons 3 --no-baseline
    python examples/utility_table.py --smoke --output-dir /tmp/ut   # tiny offline model, seconds per row
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", default="8,3,1", help="comma-separated target epsilons")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private row")
    p.add_argument("--output-dir", default="runs/utility")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--parallel", action="store_true",
                   help="start every row at once (faster on a shared machine, but each row's wall time grows)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="extra options passed to every `hf-ewtune train` run (after --)")
    return p.parse_args(argv)


def rows_to_run(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(label, hf-ewtune train options)`` per row."""
    extra = [x for x in a.train_args if x != "--"]
    common = (["--smoke"] if a.smoke else []) + ["--no-progress"] + extra
    rows = [] if a.no_baseline else [("non-private", ["--output-dir", f"{a.output_dir}/non-private", "--non-private", *common])]
    for eps in [e.strip() for e in a.epsilons.split(",") if e.strip()]:
        rows.append((f"ε = {eps}", ["--output-dir", f"{a.output_dir}/eps{eps}", "--target-epsilon", eps, *common]))
    return rows


def format_table(results: list[dict]) -> str:
    """Markdown table from the rows' ``results.json`` plus the measured process wall time."""
    lines = ["| privacy | test accuracy | certified ε (δ) | Edgeworth ε (estimate) | σ | steps | wall time | command |",
             "|---|---|---|---|---|---|---|---|"]
    certifiers = set()
    for r in results:
        if r.get("private"):
            certifiers.add(r["certified_by"])
            eps = f"{r['epsilon']:.2f} ({r['delta']:.0e})" if r.get("delta") else f"{r['epsilon']:.2f}"
            ew = f"{r['edgeworth_epsilon']:.2f}" if r.get("edgeworth_epsilon") is not None else "—"
            sigma = f"{r['noise_multiplier']:.3f}" if r.get("noise_multiplier") is not None else "—"
        else:
            eps, ew, sigma = "∞", "—", "—"
        lines.append(f"| {r['label']} | {r['metrics']['accuracy']:.4f} | {eps} | {ew} | {sigma} | {r['steps']} | "
                     f"{r['process_seconds'] / 60:.1f} min | `{r['command']}` |")
    if certifiers:
        lines += ["", "certified by: " + "; ".join(sorted(certifiers))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    results = []
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    rows = rows_to_run(a)
    running = []
    for label, opts in rows:
        command = "hf-ewtune train " + " ".join(shlex.quote(o) for o in opts)
        print(f"\n=== {label}: {command}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "hf_ewtune.cli", "train", *opts], env=env)
        running.append((label, opts, command, proc, t0))
        if not a.parallel:
            proc.wait()
            running[-1] = (label, opts, command, proc, t0, time.perf_counter() - t0)
    finished: dict[int, float] = {i: item[5] for i, item in enumerate(running) if len(item) > 5}
    while len(finished) < len(running):
        for i, item in enumerate(running):
            if i not in finished and item[3].poll() is not None:
                finished[i] = time.perf_counter() - item[4]
        time.sleep(0.5)
    for i, item in enumerate(running):
        label, opts, command, proc = item[:4]
        if proc.returncode != 0:
            print(f"utility_table.py: `{command}` failed with status {proc.returncode}", file=sys.stderr)
            return proc.returncode
        out = Path(opts[opts.index("--output-dir") + 1])
        r = json.loads((out / "results.json").read_text())
        r.update(label=label, command=command, process_seconds=finished[i])
        results.append(r)
    table = format_table(results)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n== utility table ({os.cpu_count()} CPU cores; load average at the end {load}) ==")
    print(table)
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.output_dir) / "utility_table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
