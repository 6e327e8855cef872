"""Broken DP mechanisms for the audit tests: each breaks the privacy guarantee in one place (tests only)."""

from __future__ import annotations

import dataclasses

import torch
from transformers import TrainingArguments

import hf_ewtune.trainer as trainer_module
from hf_ewtune import DPTrainer
from hf_ewtune.audit import run_audit
from hf_ewtune.sampling import PoissonBatchSampler
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
CLAIMED_EPSILON = 1.0


class NoNoiseTrainer(DPTrainer):
    """Adds ``noise_scale`` x the accounted noise: none at all.

    DPOptimizer's settings are read-only and checked against the accountant's after every step, so the bug
    is planted below those guards: each step draws noise from a scaled copy of the settings and then
    reports the honest ones (as a buggy noise routine would).
    """

    noise_scale = 0.0

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        dp = self.optimizer
        honest = dp._settings
        broken = dataclasses.replace(honest, noise_multiplier=honest.noise_multiplier * self.noise_scale)
        add_noise_and_scale = dp.add_noise_and_scale

        def buggy_add_noise_and_scale():
            dp._settings = broken
            try:
                add_noise_and_scale()
            finally:
                dp._settings = honest
                dp.last_step_settings = honest

        dp.add_noise_and_scale = buggy_add_noise_and_scale
        return optimizer


class LowNoiseTrainer(NoNoiseTrainer):
    """Adds a tenth of the accounted noise."""

    noise_scale = 0.1


class NoClippingTrainer(DPTrainer):
    """Per-example gradients are summed unclipped (the noise is still calibrated to C)."""

    def _setup_privacy(self) -> None:
        super()._setup_privacy()

        def no_clip(group_sq, total, keep):
            return torch.where(keep.unsqueeze(0), torch.ones_like(total).unsqueeze(0), torch.zeros((), dtype=total.dtype))

        self._engine._factors = no_clip


class OneNoiseShareOfTwoTrainer(NoNoiseTrainer):
    """The per-rank-share design gone wrong in a 2-process run: each rank should add N(0, sigma^2 C^2 / 2) before
    the all-reduce and one rank skips its share, so the released sum carries 1/sqrt(2) of the accounted noise.

    Written on top of DPTrainer's rank-0-only noise, that is rank 0 adding sigma C / sqrt(2): the gradient
    every replica releases is the same, just too little noise (measured in docs/audit.md; too small a break
    for a one-run audit at these settings to prove).
    """

    noise_scale = 2 ** -0.5


class NoiseAfterReduceOnRankZeroTrainer(DPTrainer):
    """Multi-process bug: the clipped sums are all-reduced FIRST, then rank 0 alone adds the noise.

    DP-DDP adds the noise once, on rank 0, BEFORE the all-reduce, so every replica steps with the same noisy
    gradient. Swap the two and the noise reaches rank 0's replica only: every other rank trains on the
    noise-free clipped mean, while rank 0, the settings and the accountant all look right. (The same
    "noise on one rank only" bug as a per-rank noise share that one rank skips, at its worst.)
    """

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        dp = self.optimizer
        honest = dp._settings
        silent = dataclasses.replace(honest, noise_multiplier=0.0)
        add_noise_and_scale = dp.add_noise_and_scale

        def buggy_add_noise_and_scale():
            step = dp._counter
            dp._settings = silent
            try:
                add_noise_and_scale()  # all-reduce SUM and division by q N, without noise
            finally:
                dp._settings = honest
                dp.last_step_settings = honest
            if torch.distributed.get_rank() == 0:  # the noise, after the reduction: rank 0's replica only
                gen = dp._generator(torch.device("cpu"), step)
                for p in dp._params():
                    noise = torch.normal(0.0, honest.noise_std, size=p.shape, generator=gen)
                    p.grad.add_(noise.to(p.grad) / honest.expected_batch_size)

        dp.add_noise_and_scale = buggy_add_noise_and_scale
        return optimizer


class OversamplingSampler(PoissonBatchSampler):
    """Draws each example with 4x the accounted rate (capped at 1)."""

    def __init__(self, num_samples, sample_rate, **kwargs):
        super().__init__(num_samples, min(1.0, 4 * sample_rate), **kwargs)


def tiny_audit(*, trainer_class=DPTrainer, num_canaries=1000, steps=10, batch_size=100, epsilon=CLAIMED_EPSILON,
               kind="gradient", tmp_path="/tmp/hf-ewtune-audit-test", model=None, train_dataset=None, **kw):
    """One audited run on a 1-layer, 16-wide BERT: 100 ordinary rows + about m/2 canaries, seeded.

    ``batch_size`` is per device (a W-process run passes 100 / W to keep the expected batch q N = 100).
    """
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=steps,
                             per_device_train_batch_size=batch_size, disable_tqdm=True, logging_strategy="no",
                             learning_rate=1e-3, ddp_find_unused_parameters=False, dataloader_num_workers=0)
    pool = tiny_classification_dataset(TOK, n=num_canaries, max_length=8, seed=1) if kind == "input" else None
    model = model if model is not None else tiny_bert(vocab_size=len(TOK), hidden_size=16, num_layers=1)
    return run_audit(model=model, args=args,
                     train_dataset=train_dataset if train_dataset is not None
                     else tiny_classification_dataset(TOK, n=100, max_length=8), num_canaries=num_canaries,
                     kind=kind, canary_pool=pool, target_epsilon=epsilon, max_grad_norm=1.0, seed=0, noise_seed=0,
                     trainer_class=trainer_class, **kw)


def oversampling(monkeypatch) -> None:
    """Make DPTrainer's dataloader draw with the oversampling sampler (the accountant still sees q)."""
    monkeypatch.setattr(trainer_module, "PoissonBatchSampler", OversamplingSampler)
