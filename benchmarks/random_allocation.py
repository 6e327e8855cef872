#!/usr/bin/env python
"""Random allocation (balls-in-bins): eps per sampling mode at equal sigma, and a Monte Carlo soundness grid.

``--table`` prints, for the main job (sigma 0.8405, q = 256/11477, 90 steps, delta 1e-6) and EW-Tune's SST-2
settings (sigma 0.7865, q = 0.029696, 660 and 99 steps, delta 1e-5), the certified eps of Poisson sampling
(dp-accounting PLD), random allocation (:class:`RandomAllocationAccountant`, with its remove and add
directions) and shuffled batches (:class:`ShuffledAccountant`, one permutation per epoch).

``--grid`` compares the certified eps of ONE epoch of random allocation with an independent Monte Carlo
lower bound (:mod:`hf_ewtune.accounting.random_allocation_mc`, Clopper-Pearson at confidence 1 - 5e-4 per
direction) for T in {4, 10, 50, 200} and sigma in {0.6, 0.8, 1, 2}; ``ok`` says certified >= lower.

Usage:
    python benchmarks/random_allocation.py --table
    python benchmarks/random_allocation.py --grid [--samples 400000] [--delta 1e-3]
"""

from __future__ import annotations

import argparse
import time

from hf_ewtune.accounting import PLDAccountant, RandomAllocationAccountant, RDPAccountant, ShuffledAccountant
from hf_ewtune.accounting.random_allocation import (
    add_epsilon,
    jensen_add_epsilon,
    lattice_add_epsilon,
    random_allocation_epsilon,
    remove_epsilon,
)
from hf_ewtune.accounting.random_allocation_mc import mc_epsilon_lower_bound
from hf_ewtune.sampling import steps_per_epoch_for

SETTINGS = (  # name, sigma, N, B, steps, delta
    ("main job (2 epochs)", 0.8405, 11477, 256, 90, 1e-6),
    ("EW-Tune SST-2, 20 epochs", 0.7865, 67349, 2000, 660, 1e-5),
    ("EW-Tune SST-2, 3 epochs", 0.7865, 67349, 2000, 99, 1e-5),
)


def table() -> None:
    print("| setting | q | T | steps | sigma | delta | Poisson (PLD) | Poisson (RDP) | random allocation (remove / add lattice; add Jensen) "
          "| shuffled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, sigma, n, b, steps, delta in SETTINGS:
        q = b / n
        spe = steps_per_epoch_for(q)
        poisson = PLDAccountant()
        rdp = RDPAccountant()
        ra = RandomAllocationAccountant()
        shuffled = ShuffledAccountant.for_sampler(num_examples=n, batch_size=b, steps_per_epoch=spe)
        for acc in (poisson, rdp, ra, shuffled):
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        h = tuple(ra.history)
        print(f"| {name} | {q:.6f} | {spe} | {steps} | {sigma} | {delta:g} | {poisson.get_epsilon(delta):.3f} | {rdp.get_epsilon(delta):.3f} | "
              f"{ra.get_epsilon(delta):.3f} ({remove_epsilon(h, delta):.3f} / {lattice_add_epsilon(h, delta):.3f}; "
              f"Jensen {jensen_add_epsilon(h, delta):.3f}) | "
              f"{shuffled.get_epsilon(delta):.3f} |")


def grid(samples: int, delta: float) -> None:
    print(f"one epoch, delta = {delta:g}, {samples} Monte Carlo samples per direction")
    print(f"{'T':>4} {'sigma':>5} {'certified':>9} {'MC lower':>9} | {'remove':>7} {'MC':>7} | {'add':>7} {'MC':>7} "
          f"{'ok':>3} {'s':>5}")
    bad = 0
    for t in (4, 10, 50, 200):
        for sigma in (0.6, 0.8, 1.0, 2.0):
            start = time.perf_counter()
            h = ((sigma, 1.0 / t, t),)
            cert = random_allocation_epsilon(h, delta)
            rem, add = remove_epsilon(h, delta), add_epsilon(h, delta)
            lo = mc_epsilon_lower_bound(noise_multiplier=sigma, steps_per_epoch=t, delta=delta, samples=samples,
                                        seed=t * 1000 + int(sigma * 100))
            ok = cert >= lo["epsilon_lower"] and rem >= lo["remove"] and add >= lo["add"]
            bad += not ok
            print(f"{t:>4} {sigma:>5} {cert:>9.4f} {lo['epsilon_lower']:>9.4f} | {rem:>7.4f} {lo['remove']:>7.4f} | "
                  f"{add:>7.4f} {lo['add']:>7.4f} "
                  f"{'yes' if ok else 'NO':>3} {time.perf_counter() - start:>5.1f}")
    print("all sound" if not bad else f"{bad} settings UNSOUND")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--delta", type=float, default=1e-3)
    args = parser.parse_args()
    if args.table or not args.grid:
        table()
    if args.grid:
        grid(args.samples, args.delta)


if __name__ == "__main__":
    main()
