"""Gaussian noise once per optimizer step, as a wrapper around any torch optimizer.

:class:`DPOptimizer` wraps whatever optimizer the Trainer builds (AdamW, SGD, ...). Its ``step()``:

1. takes ``p.grad`` = the SUM of clipped per-example gradients accumulated over the GA micro-batches
   (parameters without a gradient, e.g. after an empty logical batch, get zeros);
2. on rank 0 only, adds ``N(0, (sigma * sensitivity)^2)`` drawn in float32 from a dedicated ``torch.Generator``
   (in place, in cache-sized chunks: :func:`hf_ewtune.noise_draw.add_gaussian_noise_`);
3. in multi-process runs (``torch.distributed`` initialised, world size > 1) all-reduces the sums (SUM),
   so the noise is added exactly once across ranks;
4. divides by ``expected_batch_size`` = q N, a public constant (NEVER the realised batch size);
   FSDP2-sharded parameters (``DTensor``) skip 2-3: their gradient is already the sum over ranks (the engine
   reduce-scatters clipped sums), and every rank adds the noise to its own shard from a rank-distinct stream, so
   each coordinate is noised exactly once (:mod:`hf_ewtune.distributed.fsdp`);
5. calls the inner optimizer's ``step()``.

The noise generator is reseeded at every step from ``(base_seed, step_index)``, all bits of both (a full
mt19937 state on CPU, :mod:`hf_ewtune.rng`; ``manual_seed`` would keep 32 and let steps repeat each other's
noise): ``base_seed`` comes from OS entropy unless a ``noise_seed`` was given. Its state is never saved (HF checkpoints store the global
RNG state, not this one). A resumed run with the default entropy seed draws fresh noise; with a fixed
seed it reproduces the uninterrupted run's noise step for step (never reusing a draw for another step).

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, sensitivity=1.0, expected_batch_size=2)
    >>> p.grad = torch.tensor([2.0, 4.0, 6.0])
    >>> opt.step(); p.data
    tensor([-1., -2., -3.])
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections.abc import Callable
from typing import Any

import torch

from hf_ewtune.distributed.fsdp import is_sharded, local_noise_
from hf_ewtune.dp_settings import DPSettings, HoldsDPSettings, read_only_setting
from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from hf_ewtune.noise_draw import add_gaussian_noise_
from hf_ewtune.rng import seeded_generator
from hf_ewtune.sampling import new_seed

logger = logging.getLogger(__name__)
_SHARD_STREAM = 0x5348  # separates the per-shard noise streams from the rank-0 stream
_DCP_INIT = "_init_optim_state"  # torch.distributed.checkpoint.state_dict: an lr-0 step() on zero gradients


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DPOptimizer(torch.optim.Optimizer, HoldsDPSettings):
    """Adds calibrated Gaussian noise and the public normalisation before the wrapped optimizer's step.

    ``param_groups``, ``state``, ``defaults``, ``state_dict`` and ``load_state_dict`` are those of the
    inner optimizer, so LR schedulers and HF checkpointing work unchanged (no noise state is saved).

    sigma, the sensitivity and the expected batch size are read from one frozen
    :class:`~hf_ewtune.dp_settings.DPSettings` (pass ``settings=`` to share it with the accountant, as
    ``DPTrainer`` does, or the three numbers); they are read-only afterwards.

    Args:
        optimizer: The optimizer to wrap.
        noise_multiplier: sigma (>= 0), unless ``settings`` is given.
        sensitivity: L2 sensitivity of one example's clipped contribution (C for flat clipping), unless
            ``settings`` is given.
        expected_batch_size: The public constant q N that the noisy sum is divided by, unless ``settings``
            is given.
        settings: The run's frozen settings (instead of the three numbers above).
        noise_seed: Base seed; ``None`` draws one from OS entropy.
        step_index_fn: Returns the index of the step being taken (to derive each step's noise seed);
            default: an internal counter.
        distributed: ``None`` (auto: use ``torch.distributed`` if initialised with world size > 1),
            ``True`` or ``False``.
        clipping_norm_fn: Returns the clipping norm the per-example gradients were clipped at; checked
            against ``settings.sensitivity`` before every step (:class:`~hf_ewtune.errors.PrivacyStateError`
            if they differ, before any update).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float | None = None,
        sensitivity: float | None = None,
        expected_batch_size: float | None = None,
        settings: DPSettings | None = None,
        noise_seed: int | None = None,
        step_index_fn: Callable[[], int] | None = None,
        distributed: bool | None = None,
        clipping_norm_fn: Callable[[], float] | None = None,
    ) -> None:
        loose = {"noise_multiplier": noise_multiplier, "sensitivity": sensitivity,
                 "expected_batch_size": expected_batch_size}
        if settings is None:
            missing = [k for k, v in loose.items() if v is None]
            if missing:
                raise PrivacyConfigError(f"DPOptimizer needs settings= or all of {sorted(loose)} (missing {missing}).")
            settings = DPSettings(**loose)
        elif not isinstance(settings, DPSettings):
            raise PrivacyConfigError(f"settings must be a DPSettings, got {type(settings).__name__}.")
        elif any(v is not None for v in loose.values()):
            raise PrivacyConfigError(
                f"pass either settings= or {sorted(loose)}, not both: the noise must come from one source.")
        # Deliberately no Optimizer.__init__: every attribute below is delegated to the inner optimizer.
        self.original_optimizer = optimizer
        self._settings = settings
        self._clipping_norm_fn = clipping_norm_fn
        self._base_seed = int(noise_seed) if noise_seed is not None else new_seed()
        self._seeded_by_user = noise_seed is not None
        self._step_index_fn = step_index_fn
        self._counter = 0
        self._distributed = distributed
        self._optimizer_step_pre_hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {})
        self._optimizer_step_post_hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
        self.steps_taken = 0
        #: The frozen settings the last ``step()`` added noise with (``None`` before the first step).
        self.last_step_settings: DPSettings | None = None

    noise_multiplier = read_only_setting("noise_multiplier", holder="_settings", owner="DPOptimizer")
    sensitivity = read_only_setting("sensitivity", holder="_settings", owner="DPOptimizer")
    expected_batch_size = read_only_setting("expected_batch_size", holder="_settings", owner="DPOptimizer")

    # ---- delegation -------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, sensitivity={self.sensitivity}, "
            f"expected_batch_size={self.expected_batch_size}, inner={self.original_optimizer!r})"
        )

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally (e.g. optimizer-specific methods).
        if name == "original_optimizer":
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    # ---- the DP step ------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _generator(self, device: torch.device, step_index: int, *, shard_rank: int | None = None) -> torch.Generator:
        parts = (self._base_seed, step_index, zlib.crc32(str(device).encode()))
        if shard_rank is not None:  # FSDP2 shards: a distinct stream per rank (shards never share a draw)
            parts = (*parts, _SHARD_STREAM, shard_rank)
        # All bits of the parts (manual_seed on CPU keeps 32: steps would repeat each other's noise, see rng.py)
        return seeded_generator(device, *parts)

    def _use_distributed(self) -> bool:
        rank, world = _dist_info()
        if self._distributed is None:
            return world > 1
        return bool(self._distributed) and world > 1

    def _is_dcp_state_initialisation(self) -> bool:
        """Whether this ``step()`` is torch DCP's optimizer-state initialisation, not a training step.

        True only when called (within a few frames) from ``torch.distributed.checkpoint``'s ``_init_optim_state``
        AND every gradient is absent or exactly zero (DCP sets zeros; this rank's values are checked, no
        collective). Both are facts about the caller, never about the data: a real step, even one with all-zero
        clipped sums or learning rate 0 (warm-up), is always noised and counted.
        """
        frame = sys._getframe(2)  # skip this method and step()
        for _ in range(4):  # accelerate / torch may add a wrapper frame or two
            if frame is None:
                return False
            code = frame.f_code
            if code.co_name == _DCP_INIT and "checkpoint" in code.co_filename:
                break
            frame = frame.f_back
        else:
            return False
        for p in self._params():
            grad = p.grad
            if grad is None:
                continue
            local = grad.to_local() if is_sharded(grad) else grad
            if bool(local.any()):
                return False
        return True

    @torch.no_grad()
    def add_noise_and_scale(self) -> None:
        """Turn the accumulated clipped sums in ``p.grad`` into the noisy mean gradient (in place)."""
        settings = self._settings
        if self._clipping_norm_fn is not None:
            clipping_norm = float(self._clipping_norm_fn())
            if clipping_norm != settings.sensitivity:
                raise PrivacyStateError(
                    f"the clipping norm changed after set-up: the per-example gradients were clipped at C = "
                    f"{clipping_norm:g} but the noise is calibrated for sensitivity {settings.sensitivity:g}. "
                    "Do not modify the clipping engine; build a new DPTrainer with the max_grad_norm you want.")
        step_index = self._step_index_fn() if self._step_index_fn is not None else self._counter
        rank, _ = _dist_info()
        distributed = self._use_distributed()
        std = settings.noise_std
        gens: dict[str, torch.Generator] = {}
        shard_gens: dict[str, torch.Generator] = {}
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if is_sharded(p):  # FSDP2: the grad is already summed over ranks; each rank noises its own rows
                if std > 0:
                    local = p.grad.to_local()
                    key = str(local.device)
                    if key not in shard_gens:
                        shard_gens[key] = self._generator(local.device, step_index, shard_rank=rank)
                    local_noise_(p.grad, std=std, generator=shard_gens[key])
                p.grad.div_(settings.expected_batch_size)
                continue
            noisy = std > 0 and (rank == 0 or not distributed)
            if noisy:
                key = str(p.device)
                if key not in gens:
                    gens[key] = self._generator(p.device, step_index)
                # In place, float32 draws in cache-sized chunks; divided in the same pass when nothing is reduced.
                add_gaussian_noise_(p.grad, std=std, generator=gens[key],
                                    divide_by=None if distributed else settings.expected_batch_size)
            if distributed:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            if distributed or not noisy:
                p.grad.div_(settings.expected_batch_size)
        self.last_step_settings = settings

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Noise, (all-reduce), scale by ``1/expected_batch_size``, then the inner optimizer's step.

        torch's distributed checkpointing (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, which
        accelerate's FSDP2 checkpoints call at every save and load) initialises an optimizer without state by
        calling ``step()`` on all-zero gradients at learning rate 0 (``_init_optim_state``). That call is not a
        training step: it is passed to the inner optimizer only (which builds its state, as DCP intends), with no
        noise drawn and no step counted (:meth:`_is_dcp_state_initialisation`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._is_dcp_state_initialisation():
            self.original_optimizer.step()
            return loss
        self.add_noise_and_scale()
        self._counter += 1
        self.steps_taken += 1
        self.original_optimizer.step()
        return loss
