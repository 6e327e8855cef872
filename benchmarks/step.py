#!/usr/bin/env python
"""Time per optimizer step and peak memory: plain Trainer vs DPTrainer vs Opacus (hooks, ghost clipping).

Methods (same model, same batch, same AdamW, learning rate and data):

* ``plain``        (a) ``transformers.Trainer`` (its default ``max_grad_norm=1.0`` clip of the batch gradient).
* ``dptrainer``    (b) ``hf_ewtune.DPTrainer`` with ``poisson_sampling=False``, ``noise_multiplier=1.0``,
                   ``max_grad_norm=1.0``: a fixed batch of exactly ``--batch`` examples per step.
* ``opacus_hooks`` (c) Opacus 1.6 ``PrivacyEngine.make_private(grad_sample_mode="hooks")``, a plain loop.
* ``opacus_ghost`` (d) Opacus 1.6 fast gradient clipping, ``grad_sample_mode="ghost"`` with its
                   ``DPLossFastGradientClipping`` criterion (two backward passes), a plain loop.

Configurations: ``full`` (all-MiniLM-L6-v2, 22.7M trainable), ``lora`` (MiniLM + peft LoRA r=8 on
query/value, classifier in ``modules_to_save``), both batch 32 x sequence 128 of random token ids;
``gpt2`` (``hf_ewtune.testing.tiny_gpt2``, causal LM, tied embeddings, batch 32 x sequence 64).

Time: one process holds every method's model/trainer and runs them ROUND-ROBIN, one optimizer step
each per round (the starting method rotates every round), after ``--warmup`` discarded rounds. The
Trainer-based methods run their real ``train()`` loop in a worker thread that a callback parks after
every ``on_step_end``; the timed interval of a step runs from the moment it is released to its next
``on_step_end``, so it covers everything the loop does per step (batch fetch and collation, forward,
backward, per-example clipping, noise, optimizer and scheduler step, ``zero_grad``, every callback
including the privacy accountant). Only one method runs at any moment. The Opacus loops time
``next(batch)``, forward, loss, ``backward``, ``optimizer.step()`` (clip + noise) and ``zero_grad``.
A ratio is the median over rounds of ``t_method / t_plain`` within the same round (the CPU speed drifts
by up to 2x over minutes, so only ratios measured side by side mean anything).

Memory: per method a forked child (forked before the parent ran any torch computation) builds the
same model/trainer, resets the kernel's peak-RSS counter, records its RSS (the baseline, after the
model is loaded and wrapped), runs ``--mem-steps`` optimizer steps and reports ``VmHWM - baseline``:
the peak memory training adds on top of the loaded model (gradients, optimizer state, activations,
per-example state). Two allocator settings (``--mem-modes``): ``live`` (headline) first sets glibc's
``M_MMAP_THRESHOLD`` to 64 KiB, so every tensor is its own mapping returned on free and the RSS follows
the live tensor bytes (the CPU analogue of ``torch.cuda.max_memory_allocated``); ``rss`` keeps the default
allocator, whose heap retains freed blocks (what ``top`` shows; it depends on fragmentation as much as
on the method). The total peak (baseline included) is reported too.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/step.py                 # full run (about 10 minutes on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/step.py --quick --only gpt2

The last line printed is one JSON object; its first keys are ``full``, ``lora`` (DPTrainer / Trainer
step-time ratios), ``memory_full`` (DPTrainer / Trainer peak-memory ratio, full fine-tuning) and
``opacus_hooks_over_ours`` (Opacus hooks / DPTrainer step time, full fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    cpu_load, current_rss_mb, fmt, median, peak_rss_mb, release_freed_memory_immediately, reset_peak_rss, run_forked,
)

METHODS = ("plain", "dptrainer", "opacus_hooks", "opacus_ghost")
LABELS = {
    "plain": "(a) Trainer",
    "dptrainer": "(b) DPTrainer",
    "opacus_hooks": "(c) Opacus hooks",
    "opacus_ghost": "(d) Opacus ghost",
}
CONFIGS = ("full", "lora", "gpt2")
TARGETS = {"full": ("<=", 1.25), "lora": ("<=", 1.10), "memory_full": ("<=", 1.2), "opacus_hooks_over_ours": (">=", 1.6)}
LR = 2e-5
NOISE = 1.0
CLIP = 1.0


# --------------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    config: str
    batch: int
    seq: int
    n_examples: int
    seed: int = 0
    extra: dict = field(default_factory=dict)


def build_model(setup: Setup):
    """A fresh model for ``setup.config`` (identically initialised for every method)."""
    import torch

    torch.manual_seed(setup.seed)
    if setup.config in ("full", "lora"):
        from transformers import AutoModelForSequenceClassification

        from hf_ewtune.data import minilm_path

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        if setup.config == "lora":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"], task_type="SEQ_CLS")
            model = get_peft_model(model, cfg)
        return model
    if setup.config == "gpt2":
        from hf_ewtune.testing import tiny_gpt2

        return tiny_gpt2(vocab_size=200, seed=setup.seed)
    raise ValueError(f"unknown config {setup.config!r}")


def build_dataset(setup: Setup, vocab_size: int):
    """Random token ids (fixed seed): ``datasets.Dataset`` in torch format."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(1234)
    n, t = setup.n_examples, setup.seq
    ids = torch.randint(5, vocab_size, (n, t), generator=g)
    # Explicit [B, T] position ids: Opacus needs a per-example batch dimension on every embedding input.
    cols: dict[str, Any] = {
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones(n, t, dtype=torch.long).tolist(),
        "position_ids": torch.arange(t).expand(n, t).tolist(),
    }
    if setup.config == "gpt2":
        cols["labels"] = ids.tolist()
    else:
        cols["token_type_ids"] = torch.zeros(n, t, dtype=torch.long).tolist()
        cols["labels"] = torch.randint(0, 2, (n,), generator=g).tolist()
    return Dataset.from_dict(cols).with_format("torch")


def _vocab_size(model) -> int:
    return int(model.config.vocab_size)


# ------------------------------------------------------------------------------------------ runners
class Runner:
    """One method, ready to run optimizer steps one at a time."""

    def step(self) -> float:  # seconds for one optimizer step
        raise NotImplementedError

    def close(self) -> None:
        pass


class LoopRunner(Runner):
    def __init__(self, step_fn: Callable[[], None], keep: Any = None):
        self._step_fn = step_fn
        self._keep = keep

    def step(self) -> float:
        t0 = time.perf_counter()
        self._step_fn()
        return time.perf_counter() - t0


class TrainerRunner(Runner):
    """Drives ``trainer.train()`` in a worker thread, one optimizer step per :meth:`step` call."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        runner = self

        class _Gate(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                runner._ready.set()
                runner._wait_turn()

            def on_step_end(self, args, state, control, **kw):
                runner._last = time.perf_counter() - runner._t0
                runner._done.release()
                runner._wait_turn()
                if runner._closing:
                    control.should_training_stop = True
                return control

        self.trainer = trainer
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._ready = threading.Event()
        self._t0 = 0.0
        self._last = 0.0
        self._closing = False
        self._finished = False
        self.error: BaseException | None = None
        trainer.add_callback(_Gate())  # appended last: the library's own callbacks run inside the timed interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        while not self._ready.wait(0.05):
            if self._finished:
                raise RuntimeError(f"trainer failed before its first step: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            self.trainer.train()
        except BaseException as exc:  # surfaced in the coordinating thread
            self.error = exc
        finally:
            self._finished = True
            self._ready.set()
            self._done.release()

    def _wait_turn(self) -> None:
        self._go.acquire()
        self._t0 = time.perf_counter()

    def step(self) -> float:
        if self._finished:
            raise RuntimeError(f"trainer already finished ({self.error!r})")
        self._go.release()
        self._done.acquire()
        if self._finished:
            raise RuntimeError(f"trainer stopped during a step: {self.error!r}") from self.error
        return self._last

    def close(self) -> None:
        if not self._finished:
            self._closing = True
            self._go.release()
            self._thread.join(timeout=120)


def _training_args(setup: Setup, max_steps: int, out_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=setup.batch, max_steps=max_steps, learning_rate=LR,
        optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=True,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True, seed=setup.seed, remove_unused_columns=False,
    )


def build_trainer(method: str, setup: Setup, max_steps: int, out_dir: str):
    """(a) the plain ``transformers.Trainer`` or (b) ``DPTrainer`` (fixed batches of exactly ``setup.batch``)."""
    model = build_model(setup)
    data = build_dataset(setup, _vocab_size(model))
    targs = _training_args(setup, max_steps, out_dir)
    if method == "plain":
        from transformers import Trainer

        trainer = Trainer(model=model, args=targs, train_dataset=data)
    else:
        from hf_ewtune import DPTrainer

        trainer = DPTrainer(model=model, args=targs, train_dataset=data, noise_multiplier=NOISE, max_grad_norm=CLIP,
                            poisson_sampling=False)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no metrics dicts on stdout
    return trainer


def _per_example_loss(setup: Setup, logits, labels):
    """Mean cross-entropy per example (tokens averaged within a sequence for the causal LM)."""
    import torch.nn.functional as F

    if setup.config == "gpt2":
        lg = logits[:, :-1, :]
        tg = labels[:, 1:]
        tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none")
        return tok.view(tg.shape).mean(dim=1)
    return F.cross_entropy(logits, labels, reduction="none")


def _infinite(loader):
    while True:
        yield from loader


def make_opacus(setup: Setup, max_steps: int, out_dir: str, *, mode: str) -> Runner:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    model = build_model(setup)
    data = build_dataset(setup, _vocab_size(model))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    loader = DataLoader(data, batch_size=setup.batch, shuffle=False, drop_last=True, collate_fn=default_data_collator)
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "ghost":
            criterion = torch.nn.CrossEntropyLoss(reduction="mean")
            gsm, opt, crit, loader = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader, noise_multiplier=NOISE,
                max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="ghost", loss_reduction="mean")
        else:
            gsm, opt, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP,
                poisson_sampling=False, grad_sample_mode="hooks", loss_reduction="mean")
    batches = _infinite(loader)
    causal = setup.config == "gpt2"

    def step() -> None:
        batch = next(batches)
        labels = batch.pop("labels")
        logits = gsm(**batch).logits
        if mode == "ghost":
            if causal:
                lg = logits[:, :-1, :]
                tg = labels[:, 1:]
                loss = crit(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), shape=(tg.shape[0], tg.shape[1]))
            else:
                loss = crit(logits, labels)
        else:
            loss = _per_example_loss(setup, logits, labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return LoopRunner(step, keep=(gsm, opt, engine))


def make_runner(method: str, setup: Setup, max_steps: int, out_dir: str) -> Runner:
    if method in ("plain", "dptrainer"):
        return TrainerRunner(build_trainer(method, setup, max_steps, out_dir))
    if method == "opacus_hooks":
        return make_opacus(setup, max_steps, out_dir, mode="hooks")
    if method == "opacus_ghost":
        return make_opacus(setup, max_steps, out_dir, mode="ghost")
    raise ValueError(method)


def _make_setup(config: str, args, steps: int) -> Setup:
    seq = args.seq if config != "gpt2" else min(args.seq, 64)
    return Setup(config=config, batch=args.batch, seq=seq, n_examples=args.batch * (steps + 2))


# ------------------------------------------------------------------------------------------- memory
def memory_probe(method: str, config: str, args, mode: str) -> dict:
    """Runs in a forked child: peak RSS added by ``args.mem_steps`` optimizer steps over the loaded model.

    ``mode="live"``: glibc is first told to ``mmap`` every allocation >= 64 KiB and return it on free, so the
    RSS follows the bytes of live tensors (the CPU analogue of ``torch.cuda.max_memory_allocated``).
    ``mode="rss"``: the default allocator, whose heap keeps freed blocks (what ``top`` shows; depends on
    fragmentation as much as on the method).
    """
    import gc

    import torch

    if mode == "live" and not release_freed_memory_immediately():
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) unavailable (not glibc): use --mem-modes rss")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = _make_setup(config, args, args.mem_steps)
    with tempfile.TemporaryDirectory() as out_dir:
        runner = make_runner(method, setup, args.mem_steps, out_dir)
        gc.collect()
        exact = reset_peak_rss()
        base = current_rss_mb()
        for _ in range(args.mem_steps):
            runner.step()
        peak = peak_rss_mb()
        runner.close()
    return {"baseline_mb": base, "peak_mb": peak, "delta_mb": peak - base, "exact_reset": exact}


# --------------------------------------------------------------------------------------------- time
def time_config(config: str, methods: list[str], args, errors: dict) -> dict[str, list[float]]:
    """Interleaved timing: returns per-method lists of step times (aligned by round; None if failed)."""
    rounds = args.warmup + args.reps
    setup = _make_setup(config, args, rounds)
    runners: dict[str, Runner] = {}
    tmp = tempfile.TemporaryDirectory()
    for m in methods:
        try:
            runners[m] = make_runner(m, setup, rounds + 1, os.path.join(tmp.name, m))
        except Exception as exc:  # report and go on with the others
            errors[f"{config}/{m}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"[{config}] {m}: setup failed: {errors[f'{config}/{m}']}", file=sys.stderr, flush=True)
    times: dict[str, list[float | None]] = {m: [] for m in runners}
    live = list(runners)
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for m in order:
            try:
                t = runners[m].step()
            except Exception as exc:
                errors[f"{config}/{m}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"[{config}] {m}: step failed: {errors[f'{config}/{m}']}", file=sys.stderr, flush=True)
                live.remove(m)
                continue
            if r >= args.warmup:
                times[m].append(t)
        if r >= args.warmup:
            for m in runners:
                if m not in live and len(times[m]) < r - args.warmup + 1:
                    times[m].append(None)
        if args.verbose:
            done = {m: fmt(times[m][-1] if r >= args.warmup and times[m] else None) for m in runners}
            print(f"[{config}] round {r + 1}/{rounds} {'(warm-up) ' if r < args.warmup else ''}{done}",
                  file=sys.stderr, flush=True)
    for m in runners:
        try:
            runners[m].close()
        except Exception:
            pass
    tmp.cleanup()
    return times


def paired_ratio(num: list, den: list) -> float | None:
    pairs = [a / b for a, b in zip(num, den) if a is not None and b is not None and b > 0]
    return median(pairs)


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 warm-up round, 3 timed rounds, 2 memory steps, live memory only (smoke test)")
    p.add_argument("--only", choices=CONFIGS, action="append", help="run only this configuration (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 10; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="discarded rounds (default 2; 1 with --quick)")
    p.add_argument("--mem-steps", type=int, default=None, help="optimizer steps per memory probe (default 3; 2 with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--mem-modes", default=None,
                   help="memory probes to run: live (allocator returns freed blocks; headline) and/or rss (default "
                        "malloc); default live,rss (live only with --quick)")
    p.add_argument("--no-time", action="store_true", help="skip the timing rounds (memory probes only)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128, help="sequence length for MiniLM (tiny GPT-2 uses min(seq, 64))")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument("--profile", choices=METHODS, default=None,
                   help="instead of the benchmark: torch.profiler table of this method's steps (first --only config)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.mem_steps = args.mem_steps if args.mem_steps is not None else (2 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.mem_modes = args.mem_modes or ("live" if args.quick else "live,rss")
    args.mem_modes = [m.strip() for m in args.mem_modes.split(",") if m.strip()]
    if not set(args.mem_modes) <= {"live", "rss"}:
        p.error(f"--mem-modes takes live and/or rss, got {args.mem_modes}")
    bad = [m for m in args.methods if m not in METHODS]
    if bad or "plain" not in args.methods:
        p.error(f"--methods must include 'plain' and only name {METHODS}; got {args.methods}")
    return args


def profile(method: str, config: str, args) -> None:
    """Print torch.profiler's operator table (self CPU time) over ``args.reps`` steps of one method.

    Runs in the main thread (the profiler does not follow the timing harness's worker threads): a Trainer
    runs ``train()`` with a callback that advances the profiler schedule at every ``on_step_end``.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile, schedule
    from transformers import TrainerCallback

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.warmup + args.reps
    setup = _make_setup(config, args, steps)
    sched = schedule(wait=0, warmup=args.warmup, active=args.reps, repeat=1)
    with tempfile.TemporaryDirectory() as out_dir:
        with tprofile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
            if method in ("plain", "dptrainer"):
                trainer = build_trainer(method, setup, steps, out_dir)

                class _Advance(TrainerCallback):
                    def on_step_end(self, *a, **kw):
                        prof.step()

                trainer.add_callback(_Advance())
                t0 = time.perf_counter()
                trainer.train()
                per_step = (time.perf_counter() - t0) / steps
            else:
                runner = make_runner(method, setup, steps, out_dir)
                ts = []
                for _ in range(steps):
                    ts.append(runner.step())
                    prof.step()
                per_step = median(ts[args.warmup:])
    print(f"# profile {config}/{method}: {args.reps} profiled steps after {args.warmup} warm-up, "
          f"about {per_step:.3f} s/step (profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    configs = [c for c in CONFIGS if not args.only or c in args.only]
    if args.profile:
        warnings.filterwarnings("ignore")
        profile(args.profile, configs[0], args)
        return None
    # Import everything heavy before forking the memory probes (children then skip the import cost).
    import datasets  # noqa: F401
    import opacus  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    try:
        import hf_ewtune.trainer  # noqa: F401
    except Exception as exc:  # DPTrainer not importable: measure the others
        print(f"DPTrainer unavailable: {exc}", file=sys.stderr)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    print(f"# step.py  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  torch {torch.__version__}  transformers "
          f"{transformers.__version__}  opacus {opacus.__version__}  peft {peft.__version__}  cores {os.cpu_count()}  "
          f"load {cpu_load()}", flush=True)
    print(f"# args: batch {args.batch}, seq {args.seq}, warm-up {args.warmup}, reps {args.reps}, "
          f"memory steps {args.mem_steps}", flush=True)

    errors: dict[str, str] = {}
    mem: dict[str, dict[str, dict[str, dict]]] = {mode: {c: {} for c in configs} for mode in ("live", "rss")}
    if not args.no_memory:
        for mode in args.mem_modes:
            for c in configs:
                for m in args.methods:
                    try:
                        mem[mode][c][m] = run_forked(memory_probe, m, c, args, mode)
                    except Exception as exc:
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                        errors.setdefault(f"{c}/{m}", first[:300])
                        print(f"[{c}] {m}: {mode} memory probe failed: {first[:300]}", file=sys.stderr, flush=True)
                    if args.verbose and m in mem[mode][c]:
                        print(f"[{c}] {m}: {mode} memory {mem[mode][c][m]}", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    times = {c: ({} if args.no_time else time_config(c, args.methods, args, errors)) for c in configs}

    # ---- table
    result: dict[str, Any] = {}
    summary: dict[str, dict] = {}
    print()
    print(f"{'config':<6} {'method':<18} {'s/step':>8} {'x (a)':>6} | {'live MB+':>8} {'x (a)':>6} | "
          f"{'RSS MB+':>8} {'x (a)':>6} {'RSS MB':>7}")
    for c in configs:
        t = times[c]
        base_t = t.get("plain", [])
        summary[c] = {}
        for m in args.methods:
            ts = [x for x in t.get(m, []) if x is not None]
            med = median(ts)
            ratio = paired_ratio(t[m], base_t) if m in t and base_t else None
            row: dict[str, Any] = {"median_s": med, "time_ratio": ratio, "n": len(ts)}
            for mode, suffix in (("live", ""), ("rss", "_rss")):
                mm, b = mem[mode][c].get(m, {}), mem[mode][c].get("plain", {})
                row[f"mem_added_mb{suffix}"] = mm.get("delta_mb")
                row[f"mem_total_mb{suffix}"] = mm.get("peak_mb")
                row[f"mem_ratio{suffix}"] = mm["delta_mb"] / b["delta_mb"] if mm and b and b["delta_mb"] > 0 else None
                row[f"mem_total_ratio{suffix}"] = mm["peak_mb"] / b["peak_mb"] if mm and b else None
            summary[c][m] = row
            err = errors.get(f"{c}/{m}")
            print(f"{c:<6} {LABELS[m]:<18} {fmt(med):>8} {fmt(ratio, '.2f'):>6} | {fmt(row['mem_added_mb'], '.0f'):>8} "
                  f"{fmt(row['mem_ratio'], '.2f'):>6} | {fmt(row['mem_added_mb_rss'], '.0f'):>8} "
                  f"{fmt(row['mem_ratio_rss'], '.2f'):>6} {fmt(row['mem_total_mb_rss'], '.0f'):>7}"
                  + (f"   ERROR: {err[:100]}" if err else ""))
    print("# s/step: median seconds per optimizer step; x (a): median within-round ratio to (a).")
    print("# live MB+: peak RSS added by training with freed blocks returned at once (~ live tensor bytes);")
    print("# RSS MB+: the same with the default allocator (keeps freed blocks); RSS MB: its total peak.")
    print(f"# load at end: {cpu_load()}")

    def get(c: str, m: str, k: str):
        return summary.get(c, {}).get(m, {}).get(k)

    result["full"] = get("full", "dptrainer", "time_ratio")
    result["lora"] = get("lora", "dptrainer", "time_ratio")
    result["memory_full"] = get("full", "dptrainer", "mem_ratio")
    full_t = times.get("full", {})
    result["opacus_hooks_over_ours"] = (paired_ratio(full_t["opacus_hooks"], full_t["dptrainer"])
                                        if "opacus_hooks" in full_t and "dptrainer" in full_t else None)
    # extra keys
    result["gpt2"] = get("gpt2", "dptrainer", "time_ratio")
    result["memory_lora"] = get("lora", "dptrainer", "mem_ratio")
    result["memory_gpt2"] = get("gpt2", "dptrainer", "mem_ratio")
    result["memory_full_rss"] = get("full", "dptrainer", "mem_ratio_rss")
    result["memory_full_total"] = get("full", "dptrainer", "mem_total_ratio")
    result["memory_full_rss_total"] = get("full", "dptrainer", "mem_total_ratio_rss")
    result["opacus_ghost_over_ours"] = (paired_ratio(full_t["opacus_ghost"], full_t["dptrainer"])
                                        if "opacus_ghost" in full_t and "dptrainer" in full_t else None)
    result["targets_met"] = {
        k: (None if result[k] is None else (result[k] <= v if op == "<=" else result[k] >= v))
        for k, (op, v) in TARGETS.items()
    }
    result["summary"] = summary
    result["errors"] = errors
    result["args"] = {"batch": args.batch, "seq": args.seq, "reps": args.reps, "warmup": args.warmup,
                      "mem_steps": args.mem_steps, "configs": configs, "methods": args.methods}
    print(json.dumps(_rounded(result), default=str), flush=True)
    return result


if __name__ == "__main__":
    main()
