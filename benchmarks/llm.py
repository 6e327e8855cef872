#!/usr/bin/env python
"""LLM fine-tuning step: plain ``Trainer`` vs ``DPTrainer`` vs Opacus 1.6 ghost clipping, plus FSDP2 on 2 processes.

Models (``--models``):

* ``smollm2``: SmolLM2-135M-Instruct with its real weights (the offline GGUF of ``hf_ewtune.data.smollm2_gguf()``,
  dequantised to float32 at each load); 30 layers, hidden 576, vocabulary 49,152, tied embeddings.
* ``llama1b``: a Llama-shaped model with 1B-class widths (hidden 2048, MLP 8192, 32 heads / 8 KV heads, as
  Llama-3.2-1B), ``--layers`` layers (default 1) and a ``--vocab`` vocabulary (default 8,192), random weights,
  untied embeddings (Opacus ghost clipping refuses tied parameters).
* ``tiny``: hidden 64 (``--quick`` smoke runs only).

Fine-tuning (``--ft``): ``lora`` (peft r=8 on q/k/v/o) and/or ``full``. Sequence lengths (``--seq``, e.g.
``512,1024,2048``) and gradient checkpointing (``--ckpt off,on``; Hugging Face non-reentrant checkpointing) are
crossed with them. Random token ids, ``labels = input_ids`` (causal LM), batch ``--batch``.

Methods, same model, same batch, AdamW (lr 1e-5, constant), one optimizer step each:

* ``plain``  ``transformers.Trainer`` (its default ``max_grad_norm=1.0`` batch-gradient clip);
* ``dp``     ``hf_ewtune.DPTrainer`` (``noise_multiplier=1``, ``max_grad_norm=1``, ``poisson_sampling=False``:
             exactly ``--batch`` examples per step, the accountant still steps);
* ``opacus`` Opacus 1.6 ``grad_sample_mode="ghost"`` + ``DPLossFastGradientClipping`` (two backward passes),
             a plain loop (``poisson_sampling=False``). With gradient checkpointing it fails ("Parameter tying is
             not supported with Ghost Clipping": the recomputed forward counts as a second use of each weight);
             the error is reported in the table.

Time: per configuration, one forked child holds all methods and runs them round-robin, one optimizer step each
per round (the first method rotates), ``--warmup`` rounds discarded; the Trainers run their real ``train()`` loop
parked after every step (``step.py``'s ``TrainerRunner``). Ratios are medians of within-round ratios. Memory:
per method a forked child sets glibc's mmap threshold to 64 KiB (RSS follows live tensors), loads the model,
resets the peak-RSS counter and runs ``--mem-steps`` steps; ``added`` = peak RSS - RSS before the first step,
``total`` = peak RSS. FSDP2 (``--fsdp``): ``benchmarks/llm_fsdp.py`` (the plain DP loop of
``hf_ewtune.distributed.fsdp``: ``ClippingEngine`` + ``DPOptimizer``) on the first ``--models`` entry, full
fine-tuning, 1 process (2 threads) and ``torchrun --nproc_per_node 2`` (1 thread each, every decoder layer and
the root ``fully_shard``ed, gloo), same global batch, alternated ``--fsdp-rounds`` times.

Targets (issue 14, CPU, ratios within one run): DP time <= 1.15x and peak memory <= 1.15x plain at the same
checkpointing setting; Opacus ghost >= 1.5x DP's time. The last line printed is a JSON object.

Usage::

    python benchmarks/llm.py                      # llama1b, 1 layer, LoRA + full, T=512, no checkpointing, FSDP2
    python benchmarks/llm.py --models smollm2 --ft lora --seq 512,1024 --ckpt off,on --no-fsdp
    python benchmarks/llm.py --quick              # tiny model, smoke test (< 1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import (  # noqa: E402
    cpu_load, current_rss_mb, fmt, median, peak_rss_mb, release_freed_memory_immediately, reset_peak_rss, run_forked,
)

METHODS = ("plain", "dp", "opacus")
LABELS = {"plain": "Trainer", "dp": "DPTrainer", "opacus": "Opacus ghost"}
TARGETS = {"dp_time": 1.15, "dp_memory": 1.15, "opacus_over_dp": 1.5}
LR = 1e-5
NOISE = 1.0
LEAK_MB_PER_STEP = 32  # RSS growth per memory step above which the table flags a leak
CLIP = 1.0
SHAPES = {  # hidden, MLP, heads, KV heads
    "llama1b": (2048, 8192, 32, 8),
    "tiny": (64, 128, 4, 2),
}


# --------------------------------------------------------------------------------------------- models
def build_model(name: str, *, layers: int, vocab: int, lora: bool, ckpt: bool, untie: bool = False):
    """The model of configuration ``name`` (identically initialised in every process)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":  # the GGUF is dequantised at every load (transformers cannot save a GGUF-loaded model)
        from hf_ewtune.data import smollm2_gguf

        folder, gguf = smollm2_gguf()
        from hf_ewtune.recipes.models import dequantized_copy

        # transformers flags a GGUF-loaded model as quantized (Trainer refuses it): train a plain copy
        model = dequantized_copy(AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, torch_dtype=torch.float32, attn_implementation="sdpa"))
    else:
        hidden, mlp, heads, kv = SHAPES[name]
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
            tie_word_embeddings=not untie, attn_implementation="sdpa", pad_token_id=0, bos_token_id=0,
            eos_token_id=0))
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.train()


def build_dataset(n: int, seq: int, vocab: int):
    """Random token ids (fixed seed), ``labels = input_ids``: a ``datasets.Dataset`` in torch format."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones(n, seq, dtype=torch.long).tolist(),
                              "labels": ids.tolist()}).with_format("torch")


class Config:
    """One benchmark configuration."""

    def __init__(self, model: str, ft: str, seq: int, ckpt: bool, a: argparse.Namespace) -> None:
        self.model, self.ft, self.seq, self.ckpt = model, ft, seq, ckpt
        self.batch, self.layers, self.vocab = a.batch, a.layers, a.vocab

    @property
    def key(self) -> str:
        return f"{self.model}/{self.ft}/T{self.seq}/ckpt-{'on' if self.ckpt else 'off'}"

    def model_for(self, method: str):
        # Opacus ghost refuses tied parameters: the 1B-shaped model is untied for every method (same model);
        # SmolLM2's real weights are tied, so Opacus cannot run its full fine-tuning.
        return build_model(self.model, layers=self.layers, vocab=self.vocab, lora=self.ft == "lora", ckpt=self.ckpt,
                           untie=self.model != "smollm2")


# -------------------------------------------------------------------------------------------- runners
def make_runner(method: str, cfg: Config, steps: int, out_dir: str):
    from step import LoopRunner, TrainerRunner

    model = cfg.model_for(method)
    vocab = int(model.config.vocab_size)
    data = build_dataset(cfg.batch * (steps + 2), cfg.seq, vocab)
    if method in ("plain", "dp"):
        from transformers import Trainer, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        targs = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=cfg.batch, max_steps=steps, learning_rate=LR,
            optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=True,
            report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_drop_last=True, seed=0, remove_unused_columns=False,
            gradient_checkpointing=cfg.ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "plain":
            trainer = Trainer(model=model, args=targs, train_dataset=data)
        else:
            from hf_ewtune import DPTrainer

            trainer = DPTrainer(model=model, args=targs, train_dataset=data, noise_multiplier=NOISE,
                                max_grad_norm=CLIP, poisson_sampling=False)
        trainer.remove_callback(PrinterCallback)
        return TrainerRunner(trainer)
    return _opacus_runner(model, data, cfg, LoopRunner)


def _opacus_runner(model, data, cfg: Config, loop_runner):
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    loader = DataLoader(data, batch_size=cfg.batch, shuffle=False, drop_last=True, collate_fn=default_data_collator)
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, crit, loader = engine.make_private(
            module=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(reduction="mean"),
            data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode="ghost", loss_reduction="mean")

    def batches():
        while True:
            yield from loader

    it = batches()

    def step() -> None:
        batch = next(it)
        labels = batch.pop("labels")
        logits = gsm(**batch).logits[:, :-1, :]
        target = labels[:, 1:]
        loss = crit(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), shape=tuple(target.shape))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return loop_runner(step, keep=(gsm, opt, engine))


# ------------------------------------------------------------------------------------ probes (forked)
def memory_probe(method: str, cfg: Config, a: argparse.Namespace) -> dict:
    """Forked child: peak RSS over ``a.mem_steps`` steps, freed blocks returned at once (~ live tensor bytes)."""
    import gc

    if not release_freed_memory_immediately():
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) unavailable (not glibc)")
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as out_dir:
        runner = make_runner(method, cfg, a.mem_steps, out_dir)
        gc.collect()
        reset_peak_rss()
        base = current_rss_mb()
        after = []
        for _ in range(a.mem_steps):
            runner.step()
            after.append(current_rss_mb())
        peak = peak_rss_mb()
        runner.close()
    # RSS that stays after each step beyond the first: a leak shows up here long before it moves the peak
    growth = (after[-1] - after[0]) / (len(after) - 1) if len(after) > 1 else None
    return {"base_mb": base, "total_mb": peak, "added_mb": peak - base, "growth_mb_per_step": growth}


def time_probe(cfg: Config, methods: list[str], a: argparse.Namespace) -> dict:
    """Forked child: interleaved step times of every method (``None`` where a method failed)."""
    warnings.filterwarnings("ignore")
    rounds = a.warmup + a.reps
    runners, errors = {}, {}
    tmp = tempfile.TemporaryDirectory()
    for m in methods:
        try:
            runners[m] = make_runner(m, cfg, rounds + 1, os.path.join(tmp.name, m))
        except Exception as exc:  # report and go on with the others
            errors[m] = f"{type(exc).__name__}: {str(exc)[:200]}"
    times: dict[str, list] = {m: [] for m in methods}
    live = list(runners)
    for r in range(rounds):
        k = r % max(len(live), 1)
        for m in live[k:] + live[:k]:
            try:
                t = runners[m].step()
            except Exception as exc:
                errors[m] = f"{type(exc).__name__}: {str(exc)[:200]}"
                live.remove(m)
                continue
            if r >= a.warmup:
                times[m].append(t)
        if r >= a.warmup:
            for m in methods:
                if len(times[m]) < r - a.warmup + 1:
                    times[m].append(None)
        if a.verbose:
            print(f"  [{cfg.key}] round {r + 1}/{rounds}: "
                  + ", ".join(f"{m} {fmt(times[m][-1]) if times[m] else '-'}" for m in methods), file=sys.stderr,
                  flush=True)
    for runner in runners.values():
        try:
            runner.close()
        except Exception:
            pass
    tmp.cleanup()
    return {"times": times, "errors": errors}


def paired_ratio(num: list, den: list) -> float | None:
    return median([x / y for x, y in zip(num, den) if x is not None and y is not None and y > 0])


# --------------------------------------------------------------------------------------------- FSDP2
def run_fsdp(a: argparse.Namespace) -> dict:
    """Alternate 1-process DP and 2-process FSDP2 DP runs of ``llm_fsdp.py``; per-step medians and their ratio."""
    model = a.models[0]
    base = [os.path.join(HERE, "llm_fsdp.py"), "--model", model, "--layers", str(a.layers), "--vocab", str(a.vocab),
            "--batch", str(a.batch), "--seq", str(a.seq[0]), "--warmup", str(a.warmup), "--reps", str(a.reps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, list] = {"one_process": [], "fsdp2_two_processes": []}
    errors = []
    for _ in range(a.fsdp_rounds):
        for key, cmd in (("one_process", [sys.executable] + base),
                         ("fsdp2_two_processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2"] + base)):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                errors.append(f"{key}: exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
                continue
            runs[key].append(json.loads(lines[-1]))
    one = [r["median_s"] for r in runs["one_process"]]
    two = [r["median_s"] for r in runs["fsdp2_two_processes"]]
    return {"model": model, "seq": a.seq[0], "batch": a.batch, "runs": runs, "errors": errors,
            "one_process_s": median(one), "fsdp2_s": median(two),
            "fsdp2_over_one_process": paired_ratio(two, one)}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama1b", help="comma list of smollm2, llama1b (tiny: --quick)")
    p.add_argument("--ft", default="lora,full", help="comma list of lora, full")
    p.add_argument("--seq", default="512", help="comma list of sequence lengths, e.g. 512,1024,2048")
    p.add_argument("--ckpt", default="off", help="gradient checkpointing: comma list of off, on")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma subset of {','.join(METHODS)} (with plain)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=1, help="decoder layers of llama1b")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of llama1b")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-fsdp", action="store_true")
    p.add_argument("--fsdp-rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, T=32, LoRA/full x checkpointing off/on")
    p.add_argument("--verbose", "-v", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.seq, a.ckpt, a.vocab, a.layers, a.reps, a.mem_steps = "tiny", "32", "off,on", 256, 1, 2, 1
        a.fsdp_rounds = 1
    a.models = [m for m in a.models.split(",") if m]
    a.ft = [f for f in a.ft.split(",") if f]
    a.seq = [int(s) for s in a.seq.split(",") if s]
    a.ckpt = [c == "on" for c in a.ckpt.split(",") if c]
    a.methods = [m for m in a.methods.split(",") if m]
    if "plain" not in a.methods or not set(a.methods) <= set(METHODS):
        p.error(f"--methods must include plain and name only {METHODS}")
    if not set(a.models) <= {"smollm2", "llama1b", "tiny"} or not set(a.ft) <= {"lora", "full"}:
        p.error("--models takes smollm2, llama1b; --ft takes lora, full")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    # Heavy imports before forking (the children skip them); no torch computation runs in this process.
    import datasets  # noqa: F401
    import opacus
    import peft
    import torch
    import transformers

    import hf_ewtune.trainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    load_start = cpu_load()
    print(f"# llm.py {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  torch {torch.__version__}  transformers "
          f"{transformers.__version__}  opacus {opacus.__version__}  peft {peft.__version__}  cores {os.cpu_count()}  "
          f"load {load_start}", flush=True)
    print(f"# batch {a.batch}, llama1b layers {a.layers}, vocab {a.vocab}, warm-up {a.warmup}, reps {a.reps}, "
          f"memory steps {a.mem_steps}", flush=True)
    configs = [Config(m, f, s, c, a) for m, f, s, c in itertools.product(a.models, a.ft, a.seq, a.ckpt)]
    rows: dict[str, dict] = {}
    print(f"\n{'configuration':<34} {'method':<13} {'s/step':>8} {'x plain':>8} | {'MB added':>9} {'x plain':>8} | "
          f"{'MB total':>9} {'x plain':>8}", flush=True)
    for cfg in configs:
        mem: dict[str, dict] = {}
        errors: dict[str, str] = {}
        for m in ([] if a.no_memory else a.methods):
            try:
                mem[m] = run_forked(memory_probe, m, cfg, a)
            except Exception as exc:
                errors[m] = str(exc).strip().splitlines()[0][:200]
        t = run_forked(time_probe, cfg, a.methods, a)
        for m, e in t["errors"].items():
            errors.setdefault(m, e)
        times = t["times"]
        row: dict[str, Any] = {}
        for m in a.methods:
            ts = [x for x in times[m] if x is not None]
            mm, mp = mem.get(m), mem.get("plain")
            row[m] = {"median_s": median(ts), "time_ratio": paired_ratio(times[m], times["plain"]) if ts else None,
                      "added_mb": mm and mm["added_mb"], "total_mb": mm and mm["total_mb"],
                      "added_ratio": mm["added_mb"] / mp["added_mb"] if mm and mp and mp["added_mb"] > 0 else None,
                      "total_ratio": mm["total_mb"] / mp["total_mb"] if mm and mp else None,
                      "growth_mb_per_step": mm and mm["growth_mb_per_step"], "error": errors.get(m)}
            r = row[m]
            print(f"{cfg.key:<34} {LABELS[m]:<13} {fmt(r['median_s']):>8} {fmt(r['time_ratio'], '.2f'):>8} | "
                  f"{fmt(r['added_mb'], '.0f'):>9} {fmt(r['added_ratio'], '.2f'):>8} | {fmt(r['total_mb'], '.0f'):>9} "
                  f"{fmt(r['total_ratio'], '.2f'):>8}" + (f"   ERROR: {r['error'][:90]}" if r["error"] else "")
                  + (f"   GROWS {r['growth_mb_per_step']:.0f} MB/step (leak?)"
                     if (r["growth_mb_per_step"] or 0) > LEAK_MB_PER_STEP else ""),
                  flush=True)
        if "opacus" in times and "dp" in times:
            row["opacus_over_dp"] = paired_ratio(times["opacus"], times["dp"])
        rows[cfg.key] = row
    print("# s/step: median seconds per optimizer step; x plain: median within-round ratio to the Trainer.")
    print("# MB added: peak RSS over the loaded model (freed blocks returned at once); MB total: whole-process peak.")
    print(f"# GROWS: RSS after the last memory step exceeds that after the first by > {LEAK_MB_PER_STEP} MB per step.")
    result: dict[str, Any] = {"configs": rows}
    if not a.no_fsdp:
        fs = run_fsdp(a)
        result["fsdp2"] = fs
        print(f"# FSDP2 ({fs['model']}, full FT, T={fs['seq']}, global batch {fs['batch']}): 1 process "
              f"{fmt(fs['one_process_s'])} s/step, 2 processes (FSDP2) {fmt(fs['fsdp2_s'])} s/step, ratio "
              f"{fmt(fs['fsdp2_over_one_process'], '.2f')}" + (f"  ERRORS: {fs['errors']}" if fs["errors"] else ""),
              flush=True)
    checks = []
    for key, row in rows.items():
        dp = row.get("dp", {})
        checks.append({"config": key, "dp_time": dp.get("time_ratio"), "dp_memory_added": dp.get("added_ratio"),
                       "dp_memory_total": dp.get("total_ratio"), "opacus_over_dp": row.get("opacus_over_dp")})
    result["targets"] = TARGETS
    result["checks"] = checks
    result["load"] = {"start": load_start, "end": cpu_load()}
    result["args"] = {k: v for k, v in vars(a).items()}
    print(f"# load at start {load_start}, at end {cpu_load()}")
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
