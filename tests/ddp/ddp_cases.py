"""Training cases shared by the multi-process launch script and the in-process 1-process references.

Every case is a tiny-BERT DPTrainer run described by :func:`case_settings`. The SAME function builds the
run for W = 1 (inside pytest) and W = 2 (under ``accelerate launch``); ``per_device_train_batch_size`` is
scaled by ``2 / W`` so the expected global batch q N, and therefore q and the Poisson draws (same
``noise_seed``), are identical. A :class:`RankCheckCallback` records, at every optimizer step, facts that
only hold if the DP-DDP contract is kept:

* before the optimizer step (``on_pre_optimizer_step``): each rank's ``p.grad`` is its OWN clipped sum
  (ranks differ, norm <= local examples x C) — i.e. no DDP all-reduce of unclipped gradients;
* after the step (``on_step_end``): parameters are bitwise identical on every rank.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.sampling import is_empty_batch
from hf_ewtune.testing import tiny_bert

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resume_cases import barrier as _barrier, resume_from_checkpoint_2  # noqa: E402

REF_WORLD = 2  # the batch settings below are per device for a 2-process run

CASE_NAMES = ("full", "lora", "noisy", "variance", "empty", "resume", "users")


def case_settings(name: str) -> dict[str, Any]:
    """Dataset size, per-device batch (for W = 2), GA, steps, sigma, C, optimizer, seed for a case."""
    base = dict(n=64, per_device=4, ga=2, max_steps=3, sigma=0.0, clip=1.0, optim="sgd", lr=0.5,
                noise_seed=11, lora=False, save_steps=None, users=None)
    cases = {
        # sigma = 0: the 2-process run must give the 1-process parameters (same global batches).
        "full": dict(),
        "lora": dict(lora=True, lr=1.0),
        # same fixed noise seed: rank 0 draws exactly the 1-process noise, so even noisy runs agree.
        "noisy": dict(sigma=1.0, optim="adamw_torch", lr=1e-2),
        # pure-noise update: huge sigma, one SGD step with lr 1; entropy-seeded (the default).
        "variance": dict(sigma=1000.0, clip=0.1, max_steps=1, lr=1.0, noise_seed=None),
        # tiny q = 4/160: many empty micro-batches and empty rank slices; two epochs of 40 steps.
        "empty": dict(n=160, per_device=1, ga=2, max_steps=80, sigma=1.0),
        # stopped at checkpoint-2, resumed to 4 steps: the accountant history must match an uninterrupted run.
        "resume": dict(max_steps=4, sigma=1.0, save_steps=2, noise_seed=None, optim="adamw_torch", lr=1e-3),
        # user-level DP, LoRA: 16 users x 4 rows (cap 3), per_device counts users; users (whole) split over ranks.
        "users": dict(per_device=2, users=16, lora=True, lr=1.0),
    }
    out = dict(base)
    out.update(cases[name])
    return out


class RankCheckCallback(TrainerCallback):
    """Records per-step cross-rank facts (see module docstring). Collectives run on every rank."""

    def __init__(self, trainer: "CountingDPTrainer") -> None:
        self.trainer = trainer
        self.max_param_diff: list[float] = []
        self.grads_differ: list[bool] = []
        self.grad_norm_ok: list[bool] = []
        self.local_examples: list[int] = []

    def _flat(self, what: str) -> torch.Tensor:
        model = self.trainer.model
        vecs = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            t = p.detach() if what == "param" else (p.grad if p.grad is not None else torch.zeros_like(p))
            vecs.append(t.detach().reshape(-1).float().cpu())
        return torch.cat(vecs)

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [t]
        out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, t)
        return out

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        g = self._flat("grad")
        n_local = self.trainer.examples_this_step
        self.local_examples.append(n_local)
        self.trainer.examples_this_step = 0
        C = self.trainer.privacy_args.max_grad_norm
        self.grad_norm_ok.append(float(g.norm()) <= n_local * C * (1 + 1e-4) + 1e-6)
        grads = self._gather(g)
        self.grads_differ.append(any(not torch.equal(grads[0], x) for x in grads[1:]))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        params = self._gather(self._flat("param"))
        self.max_param_diff.append(max([float((params[0] - x).abs().max()) for x in params[1:]] or [0.0]))
        return control


class CountingDPTrainer(DPTrainer):
    """DPTrainer that counts this rank's examples and empty micro-batches (for the checks)."""

    examples_this_step = 0
    empty_micro_batches = 0
    micro_batches = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches += 1
        if is_empty_batch(inputs):
            self.empty_micro_batches += 1
        else:
            self.examples_this_step += int(inputs["labels"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)


VOCAB = 200


def deterministic_dataset(n: int, *, seq_len: int = 12, seed: int = 0):
    """``n`` labelled token sequences, identical in every process.

    (``hf_ewtune.testing.tiny_tokenizer`` is trained in code and its vocabulary can differ between
    processes, so the DDP tests do not tokenize: ranks must see the same data as the 1-process run.)
    """
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq_len), generator=gen)
    lengths = torch.randint(4, seq_len + 1, (n,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 2  # [CLS]
    labels = (ids[:, 1] % 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def _model(lora: bool, vocab: int = VOCAB) -> torch.nn.Module:
    model = tiny_bert(vocab_size=vocab, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(
            model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
        )
    return model


def build_trainer(name: str, world: int, output_dir: str, **overrides: Any) -> CountingDPTrainer:
    """The trainer of case ``name`` for a run with ``world`` processes (batch scaled to keep q N fixed)."""
    s = case_settings(name)
    s.update(overrides)
    per_device = s["per_device"] * REF_WORLD // world
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, report_to="none", max_steps=s["max_steps"],
        per_device_train_batch_size=per_device, gradient_accumulation_steps=s["ga"], learning_rate=s["lr"],
        optim=s["optim"], lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
        save_strategy="steps" if s["save_steps"] else "no", save_steps=s["save_steps"] or 500,
        logging_steps=1000, disable_tqdm=True, seed=0, ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    data = deterministic_dataset(s["n"])
    user_kwargs: dict[str, Any] = {}
    if s["users"]:  # user-level DP: row i belongs to user i % users
        data = data.add_column("author", [f"user{i % s['users']}" for i in range(s["n"])])
        user_kwargs = dict(user_id_column="author", max_examples_per_user=3)
    trainer = CountingDPTrainer(
        model=_model(s["lora"]), args=args, train_dataset=data,
        noise_multiplier=s["sigma"], max_grad_norm=s["clip"], noise_seed=s["noise_seed"], **user_kwargs,
    )
    trainer.rank_checks = RankCheckCallback(trainer)
    trainer.add_callback(trainer.rank_checks)
    return trainer


def trainable_state(trainer: DPTrainer) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (DDP ``module.`` prefix removed), on CPU."""
    model = trainer.model
    return {n.removeprefix("module."): p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_case(name: str, world: int, workdir: str) -> dict[str, Any]:
    """Run case ``name`` and return what the tests compare (identical keys for W = 1 and W = 2)."""
    import warnings

    out_dir = os.path.join(workdir, f"{name}-w{world}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(name, world, out_dir)
    before = trainable_state(trainer)
    result: dict[str, Any] = {"name": name, "world": world}
    if name == "resume":
        trainer.train()
        result["uninterrupted_steps"] = trainer.privacy_callback.steps
        _barrier()
        # A second run, "stopped" after checkpoint-2 and resumed from it in a fresh trainer.
        resumed, _ = resume_from_checkpoint_2(trainer, build_trainer, name, world, workdir, out_dir, result)
        result["secret_seeds_in_checkpoint"] = _secret_seeds_in(os.path.join(out_dir, "checkpoint-2"), trainer)
        result["resumed_param_diff"] = resumed.rank_checks.max_param_diff
    else:
        trainer.train()
    after = trainable_state(trainer)
    checks = trainer.rank_checks
    result.update(
        steps=trainer.privacy_callback.steps,
        global_step=trainer.state.global_step,
        max_param_diff=checks.max_param_diff,
        grads_differ=checks.grads_differ,
        grad_norm_ok=checks.grad_norm_ok,
        local_examples=checks.local_examples,
        empty_micro_batches=trainer.empty_micro_batches,
        micro_batches=trainer.micro_batches,
        sample_rate=trainer.sample_rate,
        wrapped=type(trainer.model_wrapped).__name__,
        expected_batch_size=trainer.expected_batch_size,
        noise_std=trainer.noise_multiplier * trainer._engine.sensitivity,
        lr=trainer.args.learning_rate,
        params={k: v for k, v in after.items()},
        delta={k: after[k] - before[k] for k in after},
    )
    result["sampler_seed"] = trainer.callback_handler.train_dataloader.batch_sampler.seed
    mine = {k: result[k] for k in ("local_examples", "empty_micro_batches", "micro_batches", "grad_norm_ok",
                                   "sampler_seed")}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        result["per_rank"] = gathered
    else:
        result["per_rank"] = [mine]
    return result


def _dp_optimizer(trainer: DPTrainer) -> Any:
    from hf_ewtune.noise import DPOptimizer

    opt = trainer.optimizer
    while not isinstance(opt, DPOptimizer):
        opt = opt.optimizer
    return opt


def _secret_seeds_in(folder: str, trainer: DPTrainer) -> list[str]:
    """Files of ``folder`` holding the noise base seed or the sampling seed (decimal text or int64 bytes)."""
    seeds = [_dp_optimizer(trainer)._base_seed, trainer.callback_handler.train_dataloader.batch_sampler.seed]
    needles = [str(x).encode() for x in seeds] + [int(x).to_bytes(8, "little") for x in seeds]
    hits = []
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                blob = fh.read()
            if any(n in blob for n in needles):
                hits.append(f)
    return hits
