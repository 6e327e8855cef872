"""Launched by tests/test_distributed.py under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU).

Usage:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/ddp/run_cases.py --expected-world-size 2 --workdir /tmp/ddp --cases full,lora,...

Runs the named cases of :mod:`ddp_cases` one after the other in the same processes (imports cost ~12 s per
launch) and writes ``workdir/results.pt`` on rank 0: per case, rank 0's result plus every rank's
per-rank facts (examples seen, empty micro-batches, gradient checks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expected-world-size", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", required=True)
    opts = parser.parse_args()

    import torch
    from accelerate import PartialState

    state = PartialState(cpu=True)  # initialises torch.distributed (gloo) from the launcher's environment
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # `accelerate launch --cpu` (without --multi_gpu) silently starts ONE process: refuse to "pass" then.
    if world != opts.expected_world_size or state.num_processes != opts.expected_world_size:
        print(f"expected world size {opts.expected_world_size}, got torch.distributed {world} / accelerate "
              f"{state.num_processes}", file=sys.stderr)
        return 3
    if world > 1:
        assert torch.distributed.get_backend() == "gloo", torch.distributed.get_backend()

    import ddp_cases as cases

    results = {}
    for name in opts.cases.split(","):
        t0 = time.time()
        result = cases.run_case(name, world, opts.workdir)
        result["seconds"] = time.time() - t0
        results[name] = result
        if state.is_main_process:
            print(f"[run_cases] {name}: {result['seconds']:.1f} s, steps={result['steps']}", flush=True)
    if state.is_main_process:
        os.makedirs(opts.workdir, exist_ok=True)
        torch.save(results, os.path.join(opts.workdir, "results.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a gloo group left alive can abort a rank at interpreter exit
    return 0


if __name__ == "__main__":
    # Results are written and the process group is destroyed: leave without the interpreter's teardown, where
    # torch 2.13's gloo threads now and then abort a rank ("terminate called without an active exception",
    # SIGABRT) after all the work is done, which failed CI runs for reasons unrelated to what is tested.
    _code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code or 0)
