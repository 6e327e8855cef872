"""DP-SGD on DeepSpeed ZeRO-1/2: the clipped sums go through ZeRO's own gradient path, noise added once.

``DPTrainer`` uses the same mechanism under ``TrainingArguments(deepspeed=...)`` / accelerate's DeepSpeed plugin
(:class:`ZeroTrainerFeed`, ``tests/test_zero_trainer.py``). In a plain loop::

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

Refused before training (:class:`~hf_ewtune.errors.UnsupportedModuleError`; from a config, before any engine
exists, :func:`zero_config_problems`): ZeRO stage 0 (use DDP) and 3, DeepSpeed's ``gradient_clipping`` (per-example
clipping replaces it), fp16 (dynamic loss scaling), bf16 (:data:`BF16_REFUSAL`) and the other paths that round the
un-noised clipped sums below fp32 inside ZeRO (``torch_autocast``, a bf16/fp16 ``communication_data_type`` or
``data_types.grad_accum_dtype``), optimizer or parameter offload, tensor parallelism, reentrant activation
checkpointing (the clipping engine's full backward would hand raw gradients to ZeRO's hooks). An optimizer (and
scheduler) built by DeepSpeed from its config is fine: it updates from ZeRO's reduced, already noised gradient
(post-processing; ``tests/test_zero_trainer.py``).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from ..clipping import ClippingEngine
from ..dp_settings import DPSettings
from ..errors import PrivacyConfigError, PrivacyStateError, UnsupportedModuleError
from ..noise_draw import add_gaussian_noise_
from ..rng import seeded_generator
from ..sampling import new_seed

_ZERO_STREAM = 0x5A45  # separates the ZeRO noise stream from DPOptimizer's

#: Why bf16 is refused under DeepSpeed, and what to use instead. DeepSpeed 0.19 casts the module's parameters to bf16
#: (``DeepSpeedEngine._configure_distributed_model``), so the clipping engine writes each micro-batch's clipped sum
#: into a bf16 ``p.grad``; ZeRO-1/2 then accumulate the micro-batches in the model dtype (``get_data_types``:
#: ``grad_accum_dtype`` defaults to it) and reduce across ranks in bf16 (``communication_data_type``). The noise
#: arrives once, on rank 0 at the boundary, so the other ranks' and the earlier micro-batches' clipped sums are
#: rounded to bf16 BEFORE the noise is added: one example can then move the released sum by more than C (a
#: rounding step of the sum flips; e.g. 2 C), and the accountant's sensitivity C no longer holds.
BF16_REFUSAL = ("bf16 with DeepSpeed is not supported yet: ZeRO-1/2 keep the gradients in bf16 (the model's dtype) "
                "and accumulate and reduce the clipped sums in bf16 before the noise is added, which can enlarge one "
                "example's influence beyond max_grad_norm. Use fp32 with DeepSpeed (bf16=False, no \"bf16\" section "
                "enabled in the DeepSpeed config), or FSDP2 with bf16=True (tested: fp32 gradients, bf16 compute)")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _low_precision_gradient_paths(engine: Any) -> list[str]:
    """The engine settings that round (un-noised) clipped sums below fp32 inside ZeRO, besides bf16/fp16 models."""
    found = []
    if getattr(engine, "torch_autocast_enabled", lambda: False)():
        found.append("torch_autocast (ZeRO reduces the gradients of Linear and other lower-precision-safe modules "
                     "in the autocast dtype, deepspeed/runtime/torch_autocast.py)")
    comm = getattr(engine, "communication_data_type", torch.float32)
    if comm in _LOW_PRECISION:
        found.append(f"communication_data_type {comm} (the clipped sums are reduced across ranks in it)")
    dtypes = getattr(engine, "get_data_types", lambda: (torch.float32, torch.float32))()
    if dtypes[1] in _LOW_PRECISION:
        found.append(f"data_types.grad_accum_dtype {dtypes[1]} (the micro-batches' clipped sums accumulate in it)")
    return found


def check_zero_engine(engine: Any) -> None:
    """Refuse the DeepSpeed set-ups the DP contract does not cover (before any training).

    Raises:
        UnsupportedModuleError: not a DeepSpeed engine, ZeRO stage other than 1/2, ``gradient_clipping``, fp16,
            bf16 (:data:`BF16_REFUSAL`), ``torch_autocast``, a bf16/fp16 ``communication_data_type`` or
            ``data_types.grad_accum_dtype``, or CPU/NVMe offload.
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
            "DeepSpeed fp16 (dynamic loss scaling, skipped steps) is not supported for DP training: use fp32.")
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        raise UnsupportedModuleError(BF16_REFUSAL + ".")
    low = _low_precision_gradient_paths(engine)
    if low:
        raise UnsupportedModuleError(
            f"DeepSpeed {'; '.join(low)} rounds the clipped sums below fp32 before the noise is added (rank 0, at the "
            "accumulation boundary), which can enlarge one example's influence beyond max_grad_norm: drop it "
            "from the DeepSpeed config (fp32 gradients, accumulation and communication).")
    offload = []
    for name, attr in (("offload_optimizer", "zero_offload_optimizer"), ("offload_param", "zero_offload_param")):
        cfg = getattr(engine, attr, lambda: None)()
        if cfg is not None and str(getattr(cfg, "device", "none")).split(".")[-1].lower() != "none":
            offload.append(name)
    if offload:
        raise UnsupportedModuleError(
            f"DeepSpeed ZeRO {', '.join(offload)} is not supported for DP training yet: drop it from the config.")



def zero_config_problems(config: Any) -> list[str]:
    """What a DeepSpeed config (a dict, a JSON file path or a JSON string) enables that DP training refuses.

    Read before any engine exists (``DPTrainingArguments``, ``DPTrainer``); :func:`check_zero_engine` checks the
    engine itself again at the first training step. ``"auto"`` values are fine: ``DPTrainer`` fills
    ``gradient_clipping`` with 0 (its ``max_grad_norm`` is the per-example C), and fp16/bf16 "auto" follow the
    ``TrainingArguments`` ``fp16``/``bf16`` flags, refused on their own (``reject_sharded_training``).

    Example:
        >>> zero_config_problems({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"})
        []
        >>> zero_config_problems({"zero_optimization": {"stage": 3}})[0][:20]
        'DeepSpeed ZeRO stage'
    """
    if isinstance(config, str):
        import json
        import os

        try:
            if os.path.isfile(config):
                with open(config, encoding="utf-8") as fh:
                    config = json.load(fh)
            else:
                config = json.loads(config)
        except (OSError, ValueError):  # transformers reports an unreadable config itself
            return []
    if not isinstance(config, dict):
        return []
    zero = config.get("zero_optimization") or {}
    found = []
    stage = zero.get("stage", 0)
    if stage != "auto" and int(stage) not in (1, 2):
        found.append(f"DeepSpeed ZeRO stage {stage} (" + (
            "stage 0 is plain data parallelism: use DDP, `accelerate launch --multi_gpu`" if int(stage) == 0 else
            "ZeRO-3 shards the parameters, not supported yet: use ZeRO stage 1/2 or FSDP2") + ")")
    clip = config.get("gradient_clipping")
    if clip not in (None, "auto") and float(clip) > 0:
        found.append(f"DeepSpeed gradient_clipping={float(clip):g} (it clips the noisy batch gradient; per-example "
                     "clipping at max_grad_norm replaces it: set it to 0 or \"auto\")")
    fp16 = config.get("fp16") or {}
    if str(fp16.get("enabled", False)).lower() == "true":
        found.append("DeepSpeed fp16 (dynamic loss scaling, skipped steps: use fp32)")
    for key in ("bf16", "bfloat16"):  # DeepSpeed reads both names
        if str((config.get(key) or {}).get("enabled", False)).lower() == "true":
            found.append(f"DeepSpeed {key} enabled ({BF16_REFUSAL})")
    rounds = "rounds the clipped sums below fp32 before the noise is added"
    if str((config.get("torch_autocast") or {}).get("enabled", False)).lower() == "true":
        found.append(f"DeepSpeed torch_autocast (it reduces Linear gradients in the autocast dtype, so it {rounds}: "
                     "use fp32, or FSDP2 with bf16=True)")
    comm = str(config.get("communication_data_type") or "fp32").lower()
    if comm not in ("fp32", "auto"):
        found.append(f"DeepSpeed communication_data_type={comm} (it {rounds}: leave it unset or \"fp32\")")
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype") or "fp32").lower()
    if accum not in ("fp32", "float32", "float", "torch.float32", "auto"):
        found.append(f"DeepSpeed data_types.grad_accum_dtype={accum} (it {rounds}: leave it unset or \"fp32\")")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if str(device).lower() not in ("none", "auto"):
            found.append(f"DeepSpeed ZeRO {key} (device {device}; not supported yet: drop it)")
    autotp = (config.get("tensor_parallel") or {}).get("autotp_size", 1)
    if autotp not in (None, "auto") and int(autotp) > 1:
        found.append(f"DeepSpeed tensor parallelism (autotp_size={autotp}; pure data parallelism only)")
    return found


def stash_grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Set aside ``p.grad`` (ZeRO-1 keeps its accumulated gradients there) so that ``p.grad`` collects the
    clipping engine's clipped sum of one micro-batch only; :func:`take_clipped_sums` puts them back."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def restore_grads(params: list[torch.Tensor], stash: list[torch.Tensor | None]) -> None:
    """Put back the gradients :func:`stash_grads` set aside."""
    for p, g in zip(params, stash):
        p.grad = g


def take_clipped_sums(params: list[torch.Tensor], stash: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """This micro-batch's clipped sums (``p.grad`` since :func:`stash_grads`; zeros where none), with the stashed
    gradients restored."""
    sums = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    restore_grads(params, stash)
    return sums


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def feed_clipped_sums(engine: Any, params: list[torch.Tensor], sums: list[torch.Tensor], *, settings: DPSettings,
                      boundary: bool, noise_seed: int, step_index: int, backward: Any) -> None:
    """Noise (rank 0, on the boundary), scale by ``W / (q N)`` and hand ``sums`` to ZeRO through the surrogate.

    Every rank must call this once per micro-batch (an empty Poisson slice with zero sums): ZeRO-2 reduces inside
    the surrogate's backward, ZeRO-1 at the boundary.

    Args:
        engine: The ``DeepSpeedEngine``.
        params: The trainable parameters, in the order of ``sums``.
        sums: This rank's clipped sums (modified in place: noise added on rank 0 at the boundary).
        settings: sigma, C and the public ``q N``.
        boundary: Whether this micro-batch ends the step (the noise is drawn once, here).
        noise_seed: Base seed of the noise (rank 0's draws).
        step_index: Index of the step (one fresh draw per step).
        backward: Runs ZeRO's backward of a scalar loss WITHOUT dividing it by the accumulation steps
            (``engine.backward(loss, scale_wrt_gas=False)``, or accelerate's ``backward(loss, scale_wrt_gas=False)``).
    """
    rank, world = _world()
    if boundary and rank == 0 and settings.noise_std > 0:
        gen = seeded_generator(sums[0].device, noise_seed, step_index, _ZERO_STREAM,
                               zlib.crc32(str(sums[0].device).encode()))
        with torch.no_grad():
            for g in sums:
                add_gaussian_noise_(g, std=settings.noise_std, generator=gen)
    scale = world / settings.expected_batch_size  # ZeRO averages over the W ranks: the update gets sum / (q N)
    # DeepSpeed's forward resets ZeRO's backward-hook bookkeeping (``clear_backward_seen_flag``); the DP paths never
    # run DeepSpeed's forward (and an empty slice runs none), so reset it here on every rank, or the ranks'
    # epilogues (and collectives) diverge.
    reset = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if reset is not None:
        reset()
    with torch.enable_grad():
        surrogate = sum((p * (g * scale).to(p.dtype).detach()).sum() for p, g in zip(params, sums))
        backward(surrogate)


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
        self.clipping.raw_gradients_reduced_by = "DeepSpeed ZeRO"  # no full backward (reentrant checkpointing)
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
        return _world()

    @torch.no_grad()
    def _clipped_sums(self, per_example_loss: torch.Tensor | None, units: torch.Tensor | None) -> list[torch.Tensor]:
        stash = stash_grads(self._params)
        if per_example_loss is not None:
            with torch.enable_grad():
                try:
                    self.clipping.backward(per_example_loss, units=units)
                except BaseException:
                    restore_grads(self._params, stash)
                    raise
        return take_clipped_sums(self._params, stash)

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
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        feed_clipped_sums(self.engine, self._params, sums, settings=self.settings, boundary=boundary,
                          noise_seed=self._base_seed, step_index=self.steps_taken,
                          backward=lambda loss: self.engine.backward(loss, scale_wrt_gas=False))
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


class ZeroTrainerFeed:
    """``DPTrainer``'s DeepSpeed ZeRO-1/2 path: the per-micro-batch feed of :func:`feed_clipped_sums`.

    ``DPTrainer.training_step`` runs the forward through ``engine.module`` and the clipping engine's backward
    between :meth:`begin` and :meth:`finish`; :meth:`finish` hands the clipped sums (noised on rank 0 on the
    accumulation boundary) to accelerate's ``backward``, which runs ZeRO's backward and, on the boundary, the
    engine's step. The :class:`~hf_ewtune.callbacks.PrivacyCallback` checks :attr:`last_step_settings` instead of
    a ``DPOptimizer`` (under DeepSpeed the optimizer adds no noise).

    Args:
        settings: The run's frozen settings (the accountant's).
        noise_seed: Base seed of the noise (``None``: OS entropy).
        step_index_fn: Returns the index of the step being taken (one fresh draw per step, resumes included).
        clipping_norm_fn: Returns the clipping engine's norm, checked against ``settings.sensitivity`` at every step.
    """

    def __init__(self, *, settings: DPSettings, noise_seed: int | None, step_index_fn: Any,
                 clipping_norm_fn: Any) -> None:
        self.settings = settings
        self._base_seed = int(noise_seed) if noise_seed is not None else new_seed()
        self._step_index_fn = step_index_fn
        self._clipping_norm_fn = clipping_norm_fn
        self._engine: Any = None
        self._params: list[torch.Tensor] = []
        self._stash: list[torch.Tensor | None] | None = None
        #: The settings the last step's noise was drawn with (``None`` before the first step).
        self.last_step_settings: DPSettings | None = None
        self.steps_taken = 0

    def bind(self, engine: Any) -> None:
        """Check ``engine`` (:func:`check_zero_engine`, pure data parallelism) the first time it is seen."""
        if engine is self._engine:
            return
        check_zero_engine(engine)
        _, world = _world()
        dp_world = int(getattr(engine, "dp_world_size", world) or world)
        if dp_world != world:
            raise UnsupportedModuleError(
                f"DeepSpeed data-parallel size {dp_world} != world size {world}: DP training supports pure data "
                "parallelism only (no tensor, pipeline or sequence parallelism).")
        self._engine = engine
        self._params = [p for p in engine.module.parameters() if p.requires_grad]

    def begin(self) -> None:
        """Set ``p.grad`` aside: the clipping engine's backward now collects this micro-batch's clipped sums."""
        self._stash = stash_grads(self._params)

    def abort(self) -> None:
        """Put the stashed gradients back after a failed micro-batch."""
        if self._stash is not None:
            restore_grads(self._params, self._stash)
            self._stash = None

    def finish(self, *, boundary: bool, backward: Any) -> None:
        """Feed this micro-batch's clipped sums to ZeRO (every rank, every micro-batch, empty slices included)."""
        if self._stash is None:
            raise PrivacyConfigError("ZeroTrainerFeed.finish() without begin().")
        sums = take_clipped_sums(self._params, self._stash)
        self._stash = None
        if boundary:
            norm = float(self._clipping_norm_fn())
            if norm != self.settings.sensitivity:
                raise PrivacyStateError(
                    f"the clipping norm changed after set-up: the per-example gradients were clipped at C = {norm:g} "
                    f"but the noise is calibrated for sensitivity {self.settings.sensitivity:g}. Build a new "
                    "DPTrainer with the max_grad_norm you want.")
        feed_clipped_sums(self._engine, self._params, sums, settings=self.settings, boundary=boundary,
                          noise_seed=self._base_seed, step_index=int(self._step_index_fn()), backward=backward)
        if boundary:
            self.last_step_settings = self.settings
            self.steps_taken += 1
