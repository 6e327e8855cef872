"""DP-SGD on DeepSpeed ZeRO-1/2: the clipped sums go through ZeRO's own gradient path, noise added once.

Use in a plain loop (``DPTrainer`` still refuses DeepSpeed: see docs/distributed.md)::

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=...), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GA,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    dp = ZeroDP(engine, max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=q * N)
    for micro_batch in my_poisson_slices:          # GA micro-batches per step on every rank, some maybe empty
        losses = per_example_losses(dp.model, micro_batch) if len(micro_batch) else None  # dp.model = engine.module
        dp.backward(losses)                        # None: an empty slice (no forward needed)
        dp.step()                                  # DeepSpeed updates on the GA-th call only

Contract (checked by ``tests/test_deepspeed_zero.py`` on 2 CPU processes with gloo):

* **Clipping before any reduction.** :class:`~hf_ewtune.clipping.ClippingEngine` differentiates with respect to
  module outputs only, so autograd never forms raw parameter gradients and ZeRO's gradient hooks (ZeRO-2
  reduce-scatters inside them) never see an unclipped gradient. The rank's clipped sum ``G_p`` is then handed to
  DeepSpeed through a *surrogate* loss ``sum_p <p, G_p>``, whose gradient with respect to ``p`` is exactly
  ``G_p``: ``engine.backward`` on it runs ZeRO's own hooks, buckets, reduce(-scatter) and accumulation. Its cost
  is one multiply-add per parameter, not a model backward.
* **Noise exactly once per coordinate.** On the accumulation boundary rank 0 adds ``N(0, (sigma C)^2)`` to its
  ``G_p`` before the surrogate backward; the other ranks add nothing; ZeRO's reduction sums the ranks, so every
  coordinate carries one draw (as in the DDP path, :class:`~hf_ewtune.noise.DPOptimizer`).
* **Division by the public expected batch** ``q N``: ZeRO averages over the ``W`` data-parallel ranks and the
  surrogate is not divided by the accumulation steps (``scale_wrt_gas=False``), so each rank feeds
  ``G_p * W / (q N)``: the update sees ``(sum of clipped sums + noise) / (q N)``.
* **Forward through** ``engine.module`` (``dp.model``), not ``engine(...)``: DeepSpeed's forward hooks the outputs
  so that a backward through them is ZeRO's own (it divides the output gradient by the accumulation steps and
  reduces at the boundary); the clipping engine's backward must not be. ``engine(...)`` raises once ``ZeroDP`` is
  attached.
* **Lockstep.** ZeRO-1/2 do not shard parameters, so the forward has no collective; an empty Poisson slice
  skips the forward but still runs the surrogate backward (zeros, plus the noise on rank 0), so ZeRO-2's
  reductions run the same number of times on every rank.

Refused before training (:class:`~hf_ewtune.errors.UnsupportedModuleError`): ZeRO stage 0 (use DDP) and 3,
DeepSpeed's ``gradient_clipping`` (per-example clipping replaces it), fp16 (dynamic loss scaling), optimizer or
parameter offload. bf16 is accepted but untested.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from ..clipping import ClippingEngine
from ..dp_settings import DPSettings
from ..errors import PrivacyConfigError, UnsupportedModuleError
from ..noise_draw import add_gaussian_noise_
from ..sampling import derive_seed, new_seed

_ZERO_STREAM = 0x5A45  # separates the ZeRO noise stream from DPOptimizer's


def check_zero_engine(engine: Any) -> None:
    """Refuse the DeepSpeed set-ups the DP contract does not cover (before any training).

    Raises:
        UnsupportedModuleError: not a DeepSpeed engine, ZeRO stage other than 1/2, ``gradient_clipping``, fp16,
            or CPU/NVMe offload.
    """
    if not all(hasattr(engine, a) for a in ("zero_optimization_stage", "module", "backward", "step")):
        raise UnsupportedModuleError(
            f"ZeroDP needs the DeepSpeedEngine returned by deepspeed.initialize(...), got {type(engine).__name__}.")
    stage = int(engine.zero_optimization_stage())
    if stage not in (1, 2):
        fix = "use DDP (accelerate launch --multi_gpu) or ZeRO stage 1/2" if stage == 0 else (
            "ZeRO-3 shards the parameters and is not supported yet: use ZeRO stage 1/2 or FSDP2 "
            "(hf_ewtune.distributed.fsdp)")
        raise UnsupportedModuleError(f"DeepSpeed ZeRO stage {stage} is not supported for DP training: {fix}.")
    clip = float(engine.gradient_clipping() or 0.0)
    if clip > 0:
        raise UnsupportedModuleError(
            f"DeepSpeed gradient_clipping={clip:g} clips the noisy batch gradient; DP training clips each example "
            "(max_grad_norm) instead. Set \"gradient_clipping\": 0 in the DeepSpeed config.")
    if engine.fp16_enabled():
        raise UnsupportedModuleError(
            "DeepSpeed fp16 (dynamic loss scaling, skipped steps) is not supported for DP training: use fp32 or bf16.")
    offload = []
    for name, attr in (("offload_optimizer", "zero_offload_optimizer"), ("offload_param", "zero_offload_param")):
        cfg = getattr(engine, attr, lambda: None)()
        if cfg is not None and str(getattr(cfg, "device", "none")).split(".")[-1].lower() != "none":
            offload.append(name)
    if offload:
        raise UnsupportedModuleError(
            f"DeepSpeed ZeRO {', '.join(offload)} is not supported for DP training yet: drop it from the config.")


def _refuse_engine_forward(module: Any, args: Any) -> None:
    raise UnsupportedModuleError(
        "Under ZeroDP, run the forward through dp.model (engine.module), not the DeepSpeed engine: engine(...) hooks "
        "its outputs so that the clipping engine's backward would be taken as DeepSpeed's own (output gradients "
        "divided by the accumulation steps, a reduction of gradients in the middle of a micro-batch).")


class ZeroDP:
    """Per-example clipping and calibrated noise for a DeepSpeed ZeRO-1/2 engine (plain training loop).

    Call :meth:`backward` and then :meth:`step` once per micro-batch, as with DeepSpeed itself; the engine's
    ``gradient_accumulation_steps`` micro-batches make one DP-SGD step (one accountant step at the global q).

    Args:
        engine: The ``DeepSpeedEngine`` from ``deepspeed.initialize`` (ZeRO stage 1 or 2, a torch optimizer).
        max_grad_norm: Per-example clipping norm C.
        noise_multiplier: sigma (>= 0).
        expected_batch_size: The public global expected batch size q N (over all ranks and micro-batches).
        noise_seed: Base seed of the noise; ``None`` draws one from OS entropy (use ``None`` for a release).
        clipping: Clipping style passed to :class:`~hf_ewtune.clipping.ClippingEngine`.

    Raises:
        UnsupportedModuleError: a set-up :func:`check_zero_engine` refuses, or data-parallel size != world size.
        PrivacyConfigError: bad ``noise_multiplier`` / ``max_grad_norm`` / ``expected_batch_size`` (from
            :class:`~hf_ewtune.dp_settings.DPSettings`).
    """

    def __init__(self, engine: Any, *, max_grad_norm: float, noise_multiplier: float, expected_batch_size: float,
                 noise_seed: int | None = None, clipping: str = "flat") -> None:
        check_zero_engine(engine)
        _, world = self._world()
        dp_world = int(getattr(engine, "dp_world_size", world) or world)
        if dp_world != world:  # rank 0 noising, and the W/(qN) scale, assume one data-parallel group of all ranks
            raise UnsupportedModuleError(
                f"ZeroDP needs pure data parallelism (data-parallel size {dp_world} != world size {world}): tensor, "
                "pipeline or sequence parallelism is not supported.")
        self.settings = DPSettings(noise_multiplier=noise_multiplier, sensitivity=max_grad_norm,
                                   expected_batch_size=expected_batch_size)
        self.engine = engine
        self.clipping = ClippingEngine(engine.module, max_grad_norm=max_grad_norm, clipping=clipping)
        self._params = [p for p in engine.module.parameters() if p.requires_grad]
        self._base_seed = int(noise_seed) if noise_seed is not None else new_seed()
        self.steps_taken = 0
        self._pending = False
        self._boundary = False
        self._guard = engine.register_forward_pre_hook(_refuse_engine_forward) if hasattr(
            engine, "register_forward_pre_hook") else None

    @property
    def model(self) -> torch.nn.Module:
        """The model to run the forward through (``engine.module``)."""
        return self.engine.module

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @torch.no_grad()
    def _clipped_sums(self, per_example_loss: torch.Tensor | None, units: torch.Tensor | None) -> list[torch.Tensor]:
        # ZeRO-1 keeps its accumulated gradients in p.grad between micro-batches: set them aside so that the
        # engine's p.grad holds this micro-batch's clipped sum only, then put them back.
        stash = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        try:
            if per_example_loss is not None:
                with torch.enable_grad():
                    self.clipping.backward(per_example_loss, units=units)
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        finally:
            for p, g in zip(self._params, stash):
                p.grad = g

    def backward(self, per_example_loss: torch.Tensor | None, *, units: torch.Tensor | None = None) -> None:
        """Clip this rank's examples and feed the (noised, on the boundary) sum to ZeRO's gradient path.

        Args:
            per_example_loss: ``Tensor[b]`` of this rank's per-example losses from the forward just run, or
                ``None`` for an empty Poisson slice (every rank must call this once per micro-batch).
            units: Optional privacy-unit ids (see :meth:`ClippingEngine.backward`).
        """
        if self._pending:
            raise PrivacyConfigError("ZeroDP.backward was called twice without step(): call step() after each "
                                     "micro-batch, as with DeepSpeed's engine.")
        sums = self._clipped_sums(per_example_loss, units)
        rank, world = self._world()
        s = self.settings
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        if boundary and rank == 0 and s.noise_std > 0:
            gen = torch.Generator(device=sums[0].device)
            gen.manual_seed(derive_seed(self._base_seed, self.steps_taken, _ZERO_STREAM,
                                        zlib.crc32(str(sums[0].device).encode())))
            for g in sums:
                add_gaussian_noise_(g, std=s.noise_std, generator=gen)
        scale = world / s.expected_batch_size  # ZeRO averages over the W ranks: the update gets sum / (q N)
        # DeepSpeed's forward resets ZeRO's backward-hook bookkeeping (``clear_backward_seen_flag``); an empty slice
        # runs no forward, so reset it here on every rank, or the ranks' epilogues (and collectives) diverge.
        reset = getattr(getattr(self.engine, "optimizer", None), "clear_backward_seen_flag", None)
        if reset is not None:
            reset()
        with torch.enable_grad():
            surrogate = sum((p * (g * scale).to(p.dtype).detach()).sum() for p, g in zip(self._params, sums))
            self.engine.backward(surrogate, scale_wrt_gas=False)
        self._pending = True
        self._boundary = boundary

    def step(self) -> None:
        """DeepSpeed's ``engine.step()`` (an optimizer update on the accumulation boundary only)."""
        if not self._pending:
            raise PrivacyConfigError("ZeroDP.step() without backward(): call backward(losses or None) first.")
        self.engine.step()
        self._pending = False
        if self._boundary:
            self.steps_taken += 1

    def remove(self) -> None:
        """Remove the clipping engine's hooks and the guard on ``engine(...)``."""
        self.clipping.remove()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
