"""Launched by tests/test_audit_two_processes.py under ``accelerate launch --multi_gpu --num_processes 2`` (gloo).

Usage:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/ddp/audit_two_processes.py --expected-world-size 2 --workdir /tmp/audit2 --mechanisms real,rank0-noise

Runs one gradient-canary audit per mechanism, one after the other in the same processes (imports cost more
than the runs), with the settings of tests/test_audit_mechanism.py: claimed epsilon = 1, 1-layer 16-wide
BERT, 100 ordinary rows + about 500 of 1000 canaries, 10 steps of expected batch 100 (50 per process), seeded.
Mechanisms: ``real`` (DPTrainer) and ``rank0-noise`` (noise added after the all-reduce, on rank 0 only:
``audit_helpers.NoiseAfterReduceOnRankZeroTrainer``); for docs/audit.md also ``one-share`` (one of two per-rank
noise shares missing: ``audit_helpers.OneNoiseShareOfTwoTrainer``). Rank 0 alone writes ``workdir/reports.json``: per
mechanism, the report plus every rank's view (world size, certified epsilon, its own lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expected-world-size", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mechanisms", required=True)
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
    assert torch.distributed.get_backend() == "gloo", torch.distributed.get_backend()

    from audit_helpers import NoiseAfterReduceOnRankZeroTrainer, OneNoiseShareOfTwoTrainer, tiny_audit
    from ddp_cases import VOCAB, deterministic_dataset  # untokenized: identical data in every process
    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert

    trainers = {"real": DPTrainer, "rank0-noise": NoiseAfterReduceOnRankZeroTrainer,
                "one-share": OneNoiseShareOfTwoTrainer}
    results = {}
    for name in opts.mechanisms.split(","):
        t0 = time.time()
        out = os.path.join(opts.workdir, name)
        report = tiny_audit(trainer_class=trainers[name], batch_size=100 // world, tmp_path=out,
                            model=tiny_bert(vocab_size=VOCAB, hidden_size=16, num_layers=1),
                            train_dataset=deterministic_dataset(100, seq_len=8))
        mine = {"rank": state.process_index, "world": world, "certified_epsilon": report.certified_epsilon,
                "epsilon_lower": report.epsilon_lower, "replicas_agree": report.replicas_agree}
        views: list = [None] * world
        torch.distributed.all_gather_object(views, mine)
        results[name] = {"report": report.to_dict(), "ranks": views, "seconds": time.time() - t0,
                         "wrote_files": sorted(os.listdir(out)) if os.path.isdir(out) else []}
        if state.is_main_process:
            print(f"[audit_two_processes] {name}: {results[name]['seconds']:.1f} s", flush=True)
            print("\n".join(report.summary_lines()), flush=True)
    if state.is_main_process:
        os.makedirs(opts.workdir, exist_ok=True)
        with open(os.path.join(opts.workdir, "reports.json"), "w") as f:
            json.dump(results, f, indent=2)
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
