#!/usr/bin/env python
"""Saddle-point accountant vs PLD: tightness and speed on a grid of fine-tuning settings.

For each setting (Poisson-subsampled Gaussian, add-or-remove-one; steps 10-50,000, q 1e-4-0.2 with at most
100 epochs, sigma 0.8 and 2, delta 1e-5 and 1e-9) it prints:

* ``PLD``: dp-accounting PLD, pessimistic, value discretization 1e-4 (certified) and its time;
* ``lower``: dp-accounting PLD with ``pessimistic_estimate=False`` (privacy buckets; a LOWER bound);
* ``SPA-CLT``: the saddle-point estimate; ``SPA bound``: its certified upper bound and its time (cold
  cache: every tilted moment recomputed);
* ``bound / PLD`` and the speed-up ``t_PLD / t_bound``; ``ok`` says ``bound >= lower``.

Times are CPU seconds of this process (``time.process_time``), so that a loaded machine does not distort them.

Usage:
    python benchmarks/saddle_point.py            # full grid (76 settings, a few minutes)
    python benchmarks/saddle_point.py --quick    # sigma 2, delta 1e-5 only (19 settings)
    python benchmarks/saddle_point.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time

from hf_ewtune.accounting.certified import dp_accounting_version, pld_epsilon
from hf_ewtune.accounting.pld_lower import optimistic_pld_epsilon
from hf_ewtune.accounting.saddle_point import clear_caches, spa_epsilon
from hf_ewtune.accounting.saddle_point_bound import spa_bound

STEPS = (10, 100, 1000, 10_000, 50_000)
RATES = (1e-4, 1e-3, 1e-2, 0.05, 0.2)
MAX_EPOCHS = 100


def settings(quick: bool):
    sigmas = (2.0,) if quick else (0.8, 2.0)
    deltas = (1e-5,) if quick else (1e-5, 1e-9)
    for sigma in sigmas:
        for delta in deltas:
            for n in STEPS:
                for q in RATES:
                    if q * n <= MAX_EPOCHS:
                        yield sigma, q, n, delta


def _timed(fn):
    # CPU time of this process (all threads), not wall time: on a shared, loaded machine wall time mostly
    # measures the other jobs
    start = time.process_time()
    value = fn()
    return value, time.process_time() - start


def measure(sigma: float, q: float, n: int, delta: float) -> dict:
    history = [(sigma, q, n)]
    pld, t_pld = _timed(lambda: pld_epsilon(history, delta))
    lower = optimistic_pld_epsilon(history, delta, value_discretization_interval=1e-4)
    clear_caches()
    estimate = spa_epsilon(history, delta)
    clear_caches()
    bound, t_bound = _timed(lambda: spa_bound(history, delta).epsilon)
    return dict(sigma=sigma, q=q, steps=n, delta=delta, pld=pld, t_pld=t_pld, lower=lower, spa_clt=estimate,
                spa_bound=bound, t_bound=t_bound, ratio=bound / pld if pld > 0 else math.nan,
                speedup=t_pld / t_bound, ok=bound >= lower)


def _f(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # dp-accounting: "privacy buckets instead of connect-the-dots"
    rows = [measure(*s) for s in settings(args.quick)]
    print(f"dp-accounting {dp_accounting_version()}, Python {platform.python_version()}, {platform.machine()}")
    print()
    print("| sigma | q | steps | delta | PLD 1e-4 | lower (opt. PLD) | SPA-CLT | SPA bound | bound / PLD | "
          "t PLD (CPU s) | t bound (CPU s) | speed-up | bound >= lower |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sigma']:g} | {r['q']:g} | {r['steps']} | {r['delta']:g} | {_f(r['pld'])} | {_f(r['lower'])} | "
              f"{_f(r['spa_clt'])} | {_f(r['spa_bound'])} | {r['ratio']:.3f} | {r['t_pld']:.3f} | "
              f"{r['t_bound']:.3f} | {r['speedup']:.0f}x | {'yes' if r['ok'] else 'NO'} |")
    tight = [r for r in rows if r["ratio"] <= 1.01]
    print()
    print(f"{len(rows)} settings; bound >= lower bound everywhere: {all(r['ok'] for r in rows)}; "
          f"bound within 1% of PLD: {len(tight)}; median bound/PLD: {statistics.median(r['ratio'] for r in rows):.3f}; "
          f"median speed-up: {statistics.median(r['speedup'] for r in rows):.0f}x; "
          f"bound time: median {statistics.median(r['t_bound'] for r in rows):.3f} s, "
          f"max {max(r['t_bound'] for r in rows):.3f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
