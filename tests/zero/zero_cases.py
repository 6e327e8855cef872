"""DeepSpeed ZeRO-1/2 DP-SGD cases, run by ``torchrun --nproc_per_node 2`` (gloo, CPU).

The 1-process references are ``tests/fsdp/fsdp_cases.run_case(kind, 1)``: the same tiny Llama, the same global
batches (``fsdp_cases.PLAN``: 2 steps x 2 micro-batches, rank 1's slice empty in one), C, B and SGD lr = 1.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fsdp"))

import fsdp_cases  # noqa: E402

from hf_ewtune.distributed.deepspeed_zero import ZeroDP  # noqa: E402
from hf_ewtune.distributed.fsdp import zero_weight_loss  # noqa: E402
from hf_ewtune.errors import UnsupportedModuleError  # noqa: E402
from tests.test_clipping_oracle import gpt2_batch, lm_loss  # noqa: E402

CASES = {  # name: (ZeRO stage, model kind, sigma)
    "zero1_full": (1, "full", 0.0),
    "zero2_full": (2, "full", 0.0),
    "zero2_lora": (2, "lora", 0.0),
    "zero1_lora": (1, "lora", 0.0),
    "zero2_variance": (2, "full", 1.0),
    "zero1_variance": (1, "full", 1.0),
}


def _engine(model, stage: int):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": len(fsdp_cases.PLAN[0]),
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=1.0), config=config)
    return engine


def run_case(name: str, rank: int) -> dict:
    stage, kind, sigma = CASES[name]
    engine = _engine(fsdp_cases._model(kind), stage)
    dp = ZeroDP(engine, max_grad_norm=fsdp_cases.C, noise_multiplier=sigma,
                expected_batch_size=fsdp_cases.B_EXP, noise_seed=11)
    try:  # DeepSpeed's own forward is refused while ZeroDP is attached (its output hooks would scale and reduce)
        engine(**fsdp_cases._rows(gpt2_batch(b=8, t=8, seed=1), [0]))
        engine_forward = "accepted"
    except UnsupportedModuleError as exc:
        engine_forward = str(exc)
    params = dict((n, p) for n, p in engine.module.named_parameters() if p.requires_grad)
    accumulations = {n: 0 for n in params}  # raw gradients reaching AccumulateGrad (ZeRO's hooks sit there)

    def counter(n):
        def hook(_p):
            accumulations[n] += 1
        return hook

    handles = [p.register_post_accumulate_grad_hook(counter(n)) for n, p in params.items()]
    variance = name.endswith("variance")
    steps = 4 if variance else len(fsdp_cases.PLAN)
    backwards = 0
    for step in range(steps):
        batch = gpt2_batch(b=8, t=8, seed=100 + step)
        for micro in fsdp_cases.PLAN[step % len(fsdp_cases.PLAN)]:
            idx = micro[rank]
            if variance:  # loss x 0: the update is the noise alone
                losses = zero_weight_loss(lm_loss(dp.model, fsdp_cases._rows(batch, idx or [0])))
            elif idx:
                losses = lm_loss(dp.model, fsdp_cases._rows(batch, idx))
            else:  # an empty Poisson slice: no forward at all
                losses = None
            dp.backward(losses)
            dp.step()
            backwards += 1
    for h in handles:
        h.remove()
    dp.remove()
    out = {n: p.detach().clone() for n, p in params.items()}
    return {"params": out, "stage": int(engine.zero_optimization_stage()),
            "optimizer": type(engine.optimizer).__name__,
            "partition_gradients": bool(getattr(engine.optimizer, "partition_gradients", False)),
            "accumulations": accumulations, "backwards": backwards, "steps_taken": dp.steps_taken,
            "global_steps": int(engine.global_steps), "engine_forward": engine_forward}


def main() -> int:
    import argparse

    import importlib

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # the module (``deepspeed.comm.torch`` is torch)

    # DeepSpeed JIT-compiles a shared-memory all-reduce kernel (g++/ninja, minutes on 2 cores) when its CPU
    # backend starts; it is used by inference only. Skip it: training runs on plain gloo collectives.
    ds_torch_comm.build_shm_op = lambda: None
    import faulthandler

    faulthandler.enable()  # a gloo abort (collective mismatch) prints each rank's Python stack
    if os.environ.get("ZERO_CASES_DUMP_AFTER"):  # debugging a hang: every rank prints its stack, then exits
        faulthandler.dump_traceback_later(float(os.environ["ZERO_CASES_DUMP_AFTER"]), exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    opts = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    results = {name: run_case(name, rank) for name in opts.cases.split(",")}
    results["world"] = torch.distributed.get_world_size()
    if rank == 0:
        torch.save(results, opts.out)
    else:  # rank 1's parameters too: ZeRO must leave the ranks identical
        torch.save(results, opts.out + ".rank1")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Results are written and the process group is destroyed: leave without the interpreter's teardown, where
    # torch 2.13's gloo threads now and then abort a rank ("terminate called without an active exception",
    # SIGABRT) after all the work is done, which failed CI runs for reasons unrelated to what is tested.
    _code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code or 0)
