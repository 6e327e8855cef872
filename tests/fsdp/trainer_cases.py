"""``DPTrainer`` under accelerate's FSDP2 plugin (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``).

Run by ``torchrun --nproc_per_node 2`` (gloo, CPU) and, as the references, in one process without FSDP (the
same function, W = 1, ``per_device_train_batch_size`` doubled so q N and the Poisson draws are identical).

accelerate 1.16 never enables FSDP on CPU processes: ``AcceleratorState.__init__`` (accelerate/state.py, the
``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`` branch) is the only place that turns
``distributed_type`` into ``FSDP`` and keeps the ``fsdp_plugin``; ``MULTI_CPU`` is not in that list, so on CPU
the plugin is dropped and ``Trainer`` silently trains with DDP. :func:`emulate_accelerate_fsdp_on_cpu` (TEST
ONLY, not a user setting) runs that branch's assignments (and the copy of ``distributed_type`` into
``PartialState._shared_state`` right after it) for ``MULTI_CPU`` too; everything else
(``fully_shard`` of every decoder layer and the root by accelerate's ``fsdp2_prepare_model``, the optimizer
re-bound to the ``DTensor`` parameters, FSDP checkpoints) is accelerate's and transformers' own code path.
"""

from __future__ import annotations

import os
import zlib
import sys
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from hf_ewtune import DPTrainer  # noqa: E402
from hf_ewtune.callbacks import _dp_optimizer  # noqa: E402
from hf_ewtune.distributed.fsdp import is_sharded  # noqa: E402
from hf_ewtune.sampling import is_empty_batch  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
from resume_cases import barrier as _barrier, rank as _rank, resume_from_checkpoint_2  # noqa: E402,F401

CASES = ("full", "lora", "bf16", "variance", "ckpt", "resume", "resume_full")
VOCAB = 200


def emulate_accelerate_fsdp_on_cpu() -> None:
    """TEST ONLY: let accelerate keep its FSDP plugin on CPU processes, as it does on GPUs (see module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_hf_ewtune_emulated", False):
        return

    def __init__(self, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # what the MULTI_GPU branch does
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # ...and the line after that branch: every later AcceleratorState() copies PartialState's shared state
            # over its own, so without this the next one (the Trainer makes several) reverts to MULTI_CPU and
            # accelerate's FSDP2 paths (get_state_dict's full gather for FULL_STATE_DICT saves) are skipped.
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._hf_ewtune_emulated = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__


def case_settings(name: str) -> dict[str, Any]:
    """Per case: data size, per-device batch (for W = 2), GA, steps, sigma, C, precision, LoRA, saves."""
    # q = 1 x 2 x 2 / 48: each rank's micro-batch holds 1 example in expectation, so empty slices on one rank
    # (and ranks with 2-3 examples, i.e. 2-3 physical chunks at max_physical_batch_size=1) happen every step.
    # noise_seed 10 also fixes the sampling seed: its draws (full-state streams, hf_ewtune.rng) give empty slices in
    # these 3 steps, which the empty-slice assertions need (11, the seed before the streams changed, gives none).
    base = dict(n=48, per_device=1, ga=2, max_steps=3, sigma=0.0, clip=0.05, lr=0.5, lora=False, bf16=False,
                dtype=torch.float64, save_steps=None, noise_seed=10, physical=1, state_dict_type="FULL_STATE_DICT",
                optim="sgd", checkpointing=None)
    cases = {
        "full": dict(),
        "lora": dict(lora=True, lr=1.0),
        # 'full' with activation (gradient) checkpointing of every decoder layer: HF's default kwargs
        # (use_reentrant=False in transformers 5) and use_reentrant=True; the 1-process reference is 'full'
        "ckpt": dict(checkpointing={}),
        # refused before training (PrivacyConfigError; the engine also refuses a model checkpointed that way): the
        # full backward reentrant blocks need lets FSDP2 reduce-scatter raw gradients (the update came out wrong)
        "ckpt_reentrant": dict(checkpointing={"use_reentrant": True}),
        "bf16": dict(bf16=True, dtype=torch.float32, physical=None),
        # pure noise: sigma = 1000, one SGD step with lr 1 (the clipped signal is 1e-3 of the noise)
        "variance": dict(sigma=1000.0, max_steps=1, lr=1.0, noise_seed=None, physical=None),
        "resume": dict(sigma=1.0, max_steps=4, save_steps=2, noise_seed=None, physical=None, lr=1e-2,
                       state_dict_type=os.environ.get("TRAINER_CASES_STATE_DICT", "SHARDED_STATE_DICT")),
        # transformers' default FULL_STATE_DICT: a from_pretrained folder per checkpoint, optimizer state gathered.
        # AdamW: torch's full-state-dict optimizer LOAD needs one tensor in the optimizer state (plain SGD has none:
        # "Expected device to be set", torch/distributed/checkpoint/state_dict.py; docs/distributed.md).
        # 'full' with AdamW: the 1-process reference of the DeepSpeed ZeRO-2 run whose optimizer is built by DeepSpeed
        # from its config (tests/zero/zero_trainer_cases.py, "zero2_ds_optimizer")
        "full_adamw": dict(optim="adamw_torch", lr=1e-3),
        "resume_full": dict(sigma=1.0, max_steps=4, save_steps=2, noise_seed=None, physical=None, lr=1e-2,
                            state_dict_type="FULL_STATE_DICT", optim="adamw_torch"),
    }
    out = dict(base)
    out.update(cases[name])
    return out


def dataset(n: int, *, seq_len: int = 8, seed: int = 0):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq_len), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def model_for(settings: dict[str, Any]) -> torch.nn.Module:
    """Tiny Llama, tied embeddings, RMSNorm (the torch.func rule); LoRA on q/v if asked."""
    from tests.test_clipping_llama import tiny_llama

    model = tiny_llama(settings["dtype"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if settings["lora"]:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=2,
                                                 lora_alpha=4, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))  # not hash(): salted per process
    return model


class Counts(TrainerCallback):
    """Per optimizer step: this rank's examples, empty micro-batches and the forwards the engine ran."""

    def __init__(self) -> None:
        self.examples: list[int] = []
        self.empties = 0
        self.current = 0
        self.layer_calls = 0  # forwards of layer 0's q_proj (twice per micro-batch with checkpointing)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.examples.append(self.current)
        self.current = 0
        return control


class CountingDPTrainer(DPTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        if os.environ.get("TRAINER_CASES_VERBOSE"):
            kinds = {n: type(p).__name__ for n, p in self.model.named_parameters() if n.endswith(("model.norm.weight",
                                                                                                "embed_tokens.weight"))}
            print(f"[rank {_rank()}] micro-batch empty={is_empty_batch(inputs)} step={self.state.global_step} {kinds}",
                  flush=True)
        if is_empty_batch(inputs):
            self.counts.empties += 1
        else:
            self.counts.current += int(inputs["labels"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)


def build_trainer(name: str, world: int, output_dir: str) -> CountingDPTrainer:
    s = case_settings(name)
    per_device = s["per_device"] * 2 // world
    checkpointing = {} if s["checkpointing"] is None else dict(
        gradient_checkpointing=True, gradient_checkpointing_kwargs=s["checkpointing"] or None)
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                        "state_dict_type": s["state_dict_type"]}) if world > 1 else {}
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to="none", max_steps=s["max_steps"],
        per_device_train_batch_size=per_device, gradient_accumulation_steps=s["ga"], learning_rate=s["lr"],
        optim=s["optim"], lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0, bf16=s["bf16"],
        save_strategy="steps" if s["save_steps"] else "no", save_steps=s["save_steps"] or 500,
        logging_steps=1000, disable_tqdm=True, seed=0, dataloader_num_workers=0, **fsdp, **checkpointing,
    )
    trainer = CountingDPTrainer(
        model=model_for(s), args=args, train_dataset=dataset(s["n"]), noise_multiplier=s["sigma"],
        max_grad_norm=s["clip"], noise_seed=s["noise_seed"], max_physical_batch_size=s["physical"],
    )
    trainer.counts = Counts()
    trainer.add_callback(trainer.counts)
    layers = [m for n, m in trainer.model.named_modules() if type(m).__name__.endswith("LlamaDecoderLayer")]
    # on a Linear inside: the decoder layer's own hooks run outside the checkpointed function (once per forward), and
    # the engine re-runs RMSNorms (torch.func rule) through their forward
    layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda *_: setattr(trainer.counts, "layer_calls", trainer.counts.layer_calls + 1))
    return trainer


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, gathered to full size (a collective under FSDP2)."""
    return {n: (p.full_tensor() if is_sharded(p) else p.detach()).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def run_case(name: str, world: int, workdir: str) -> dict[str, Any]:
    import warnings

    out_dir = os.path.join(workdir, f"{name}-w{world}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(name, world, out_dir)
        initial = full_params(trainer.model)
        trainer.train()
    result: dict[str, Any] = {
        "params": full_params(trainer.model), "initial": initial,
        "sharded": any(is_sharded(p) for p in trainer.model.parameters()),
        "fsdp_enabled": trainer.is_fsdp_enabled, "model_class": type(trainer.model).__name__,
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "steps": trainer.privacy_callback.steps, "expected_batch_size": trainer.expected_batch_size,
        "sample_rate": trainer.sample_rate, "noise_std": trainer.noise_multiplier * trainer._engine.sensitivity,
    }
    if name.startswith("resume"):
        resumed, _ = resume_from_checkpoint_2(trainer, build_trainer, name, world, workdir, out_dir, result)
        # DPOptimizer.step calls that took noise: the DCP optimizer-state initialisation at a save or a load (an
        # lr-0 step on zero gradients) must not count.
        result["optimizer_steps"] = _dp_optimizer(trainer.optimizer).steps_taken
        result["resumed_optimizer_steps"] = _dp_optimizer(resumed.optimizer).steps_taken
        if s_type(name) == "FULL_STATE_DICT":  # the final save: a from_pretrained folder holding the trained weights
            final = os.path.join(out_dir, "final")
            trainer.save_model(final)  # every rank (the full state dict is gathered)
            _barrier()
            if _rank() == 0:
                from safetensors.torch import load_file

                result["final_files"] = sorted(os.listdir(final))
                result["final_weights"] = load_file(os.path.join(final, "model.safetensors"))
    mine = {"examples": trainer.counts.examples, "empties": trainer.counts.empties,
            "layer_calls": trainer.counts.layer_calls}
    result["checkpointing"] = bool(getattr(trainer.accelerator.unwrap_model(trainer.model), "is_gradient_checkpointing",
                                           False))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        result["per_rank"] = gathered
    else:
        result["per_rank"] = [mine]
    return result


def s_type(name: str) -> str:
    return case_settings(name)["state_dict_type"]


def main() -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    opts = parser.parse_args()
    if os.environ.get("TRAINER_CASES_DUMP_AFTER_S"):  # debugging a hang: print every rank's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["TRAINER_CASES_DUMP_AFTER_S"]), exit=True)
    emulate_accelerate_fsdp_on_cpu()
    from accelerate import PartialState

    state = PartialState(cpu=True)  # gloo, from torchrun's environment
    world = state.num_processes
    results = {}
    for name in opts.cases.split(","):
        t0 = time.time()
        if os.environ.get("TRAINER_CASES_KEEP_GOING"):  # debugging: report a failing case and go on
            try:
                results[name] = run_case(name, world, opts.workdir)
            except Exception:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                continue
        else:
            results[name] = run_case(name, world, opts.workdir)
        if state.is_main_process:
            print(f"[trainer_cases] {name}: {time.time() - t0:.1f} s", flush=True)
            torch.save(results, os.path.join(opts.workdir, "results.pt"))  # after every case (debugging)
    _barrier()
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
