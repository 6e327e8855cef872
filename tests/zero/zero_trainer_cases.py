"""``DPTrainer`` under DeepSpeed ZeRO-1/2 through ``TrainingArguments(deepspeed=...)`` (accelerate's DeepSpeed plugin).

Run by ``torchrun --nproc_per_node 2`` (gloo, CPU); the 1-process references are ``tests/fsdp/trainer_cases.py``'s
(the same function without sharding: same data, model, q N and Poisson draws).

accelerate 1.16 never enables DeepSpeed on CPU processes: ``AcceleratorState.__init__`` (accelerate/state.py) keeps
the DeepSpeed plugin only in ``elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not cpu``, and without
``use_cpu`` ``PartialState`` finds no accelerator (``distributed_type`` NO, 1 process on every rank).
:func:`emulate_accelerate_deepspeed_on_cpu` (TEST ONLY, not a user setting) runs that branch's assignments for
``MULTI_CPU`` too (and the copy of ``distributed_type`` into ``PartialState._shared_state`` after it, as for FSDP2);
everything else (transformers' ``deepspeed_init``, accelerate's ``_prepare_deepspeed`` / ``deepspeed.initialize``,
``DeepSpeedEngineWrapper.backward`` and the engine's step, DeepSpeed checkpoints) is the library code a GPU run uses.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fsdp"))

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import trainer_cases as fsdp_trainer_cases  # noqa: E402

CASES = ("zero1_full", "zero2_full", "zero1_lora", "zero2_lora", "variance", "resume", "zero2_ds_optimizer")
#: "zero2_ds_optimizer": the optimizer comes from the DeepSpeed config (transformers hands accelerate a DummyOptim and
#: DeepSpeed builds torch's AdamW itself); "auto" fills lr, betas, eps and weight decay from the TrainingArguments.
DS_CONFIG_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto", "torch_adam": True}}


class Snapshot(TrainerCallback):
    """The trainable parameters when training begins (after a resume has loaded the DeepSpeed checkpoint)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        return control


def case_settings(name: str) -> dict[str, Any]:
    """The FSDP2 Trainer cases' settings (same data, model, q N and draws) plus the ZeRO stage."""
    base_name, stage = {"zero1_full": ("full", 1), "zero2_full": ("full", 2), "zero2_lora": ("lora", 2),
                        "zero1_lora": ("lora", 1), "variance": ("variance", 2), "resume": ("resume", 1),
                        "zero2_ds_optimizer": ("full_adamw", 2)}[name]
    s = fsdp_trainer_cases.case_settings(base_name)
    s["stage"] = stage
    s["base"] = base_name
    return s


def build_trainer(name: str, world: int, output_dir: str):
    s = case_settings(name)
    per_device = s["per_device"] * 2 // world
    ds = {"zero_optimization": {"stage": s["stage"]}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "steps_per_print": 10**9} if world > 1 else None
    if ds is not None and name == "zero2_ds_optimizer":
        ds["optimizer"] = dict(DS_CONFIG_OPTIMIZER, params=dict(DS_CONFIG_OPTIMIZER["params"]))
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to="none", max_steps=s["max_steps"],
        per_device_train_batch_size=per_device, gradient_accumulation_steps=s["ga"], learning_rate=s["lr"],
        optim=s["optim"], lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
        save_strategy="steps" if s["save_steps"] else "no", save_steps=s["save_steps"] or 500,
        logging_steps=1000, disable_tqdm=True, seed=0, dataloader_num_workers=0, deepspeed=ds,
    )
    trainer = fsdp_trainer_cases.CountingDPTrainer(
        model=fsdp_trainer_cases.model_for(s), args=args, train_dataset=fsdp_trainer_cases.dataset(s["n"]),
        noise_multiplier=s["sigma"], max_grad_norm=s["clip"], noise_seed=s["noise_seed"],
        max_physical_batch_size=s["physical"],
    )
    trainer.counts = fsdp_trainer_cases.Counts()
    trainer.add_callback(trainer.counts)
    trainer.snapshot = Snapshot()
    trainer.add_callback(trainer.snapshot)
    # raw gradients reaching AccumulateGrad, where ZeRO's reduce hooks sit: the surrogate's only (one per micro-batch)
    trainer.accumulations = {}
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            trainer.accumulations[n] = 0
            p.register_post_accumulate_grad_hook(
                lambda _p, n=n: trainer.accumulations.__setitem__(n, trainer.accumulations[n] + 1))
    return trainer


def params_of(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped) if trainer.model_wrapped is not None else trainer.model
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_case(name: str, world: int, workdir: str) -> dict[str, Any]:
    import warnings

    out_dir = os.path.join(workdir, f"{name}-w{world}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(name, world, out_dir)
        initial = params_of(trainer)
        trainer.train()
    engine = trainer.model_wrapped
    result: dict[str, Any] = {
        "params": params_of(trainer), "initial": initial,
        "deepspeed_enabled": trainer.is_deepspeed_enabled, "engine_class": type(engine).__name__,
        "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else None,
        "zero_optimizer": type(getattr(engine, "optimizer", None)).__name__,
        "gradient_clipping": float(engine.gradient_clipping()) if hasattr(engine, "gradient_clipping") else None,
        "engine_global_steps": int(getattr(engine, "global_steps", -1)),
        "steps": trainer.privacy_callback.steps, "expected_batch_size": trainer.expected_batch_size,
        "sample_rate": trainer.sample_rate, "noise_std": trainer.noise_multiplier * trainer._engine.sensitivity,
        "feed_steps": getattr(getattr(trainer, "_zero_feed", None), "steps_taken", None),
        "accumulations": sorted(set(trainer.accumulations.values())),
        "micro_batches": trainer.state.global_step * case_settings(name)["ga"],
        "optimizer": type(trainer.optimizer).__name__,
        "basic_optimizer": type(getattr(engine, "basic_optimizer", None)).__name__,
        "ds_optimizer_name": engine.optimizer_name() if hasattr(engine, "optimizer_name") else None,
    }
    if name == "zero2_full":  # evaluation after training runs through the DeepSpeed engine's own forward
        result["eval"] = trainer.evaluate(eval_dataset=fsdp_trainer_cases.dataset(8, seed=5))
        result["params_after_eval"] = params_of(trainer)
    if name == "resume":
        resumed, ckpt = fsdp_trainer_cases.resume_from_checkpoint_2(trainer, build_trainer, name, world, workdir,
                                                                    out_dir, result)
        result["resumed_feed_steps"] = resumed._zero_feed.steps_taken
        result["resumed_start"] = resumed.snapshot.params  # after the DeepSpeed checkpoint was loaded
        if _rank() == 0:
            from safetensors.torch import load_file

            result["checkpoint_weights"] = load_file(os.path.join(ckpt, "model.safetensors"))
        final = os.path.join(out_dir, "final")
        trainer.save_model(final)  # every rank (DeepSpeed gathers the state dict)
        _barrier()
        if _rank() == 0:
            result["final_files"] = sorted(os.listdir(final))
            result["final_weights"] = load_file(os.path.join(final, "model.safetensors"))
    mine = {"examples": trainer.counts.examples, "empties": trainer.counts.empties}
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        result["per_rank"] = gathered
        params: list = [None] * world
        torch.distributed.all_gather_object(params, result["params"])
        result["rank_params"] = params
    else:
        result["per_rank"] = [mine]
    return result


_rank = fsdp_trainer_cases._rank
_barrier = fsdp_trainer_cases._barrier


def main() -> int:
    import argparse
    import time

    # DeepSpeed JIT-compiles a shared-memory all-reduce kernel (g++/ninja, minutes on 2 cores) when its CPU backend
    # starts; inference only. Skip it: training runs on plain gloo collectives (as tests/zero/zero_cases.py).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import faulthandler

    faulthandler.enable()
    if os.environ.get("TRAINER_CASES_DUMP_AFTER_S"):  # debugging a hang: print every rank's stack, then exit
        faulthandler.dump_traceback_later(float(os.environ["TRAINER_CASES_DUMP_AFTER_S"]), exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    opts = parser.parse_args()
    from accelerate import PartialState

    state = PartialState(cpu=True)  # gloo, from torchrun's environment
    world = state.num_processes
    results = {}
    for name in opts.cases.split(","):
        t0 = time.time()
        if os.environ.get("TRAINER_CASES_KEEP_GOING"):
            try:
                results[name] = run_case(name, world, opts.workdir)
            except Exception:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                continue
        else:
            results[name] = run_case(name, world, opts.workdir)
        if state.is_main_process:
            print(f"[zero trainer_cases] {name}: {time.time() - t0:.1f} s", flush=True)
            torch.save(results, os.path.join(opts.workdir, "results.pt"))
    _barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    _code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code or 0)
