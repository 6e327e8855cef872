"""DP-SGD on FSDP2 (``torch.distributed.fsdp.fully_shard``): clipped sums reduce-scattered, noise on each shard once.

Contract (checked by ``tests/test_fsdp.py`` on 2 CPU processes with gloo):

* **Per-example norms from each rank's own examples.** FSDP2 unshards a module's parameters for its forward
  and backward; the clipping engine's hooks see that module call as usual and record its input ``A`` and output
  gradient ``G`` for the rank's own examples. Norms and clipping factors are computed locally, from full-size
  (unsharded) per-example quantities: nothing about other ranks' examples is needed.
* **Clipping before any reduction.** The engine's backward differentiates with respect to module *outputs*
  only, so autograd never produces the raw parameter gradients: FSDP2's own reduce-scatter (which runs on
  unsharded ``.grad`` in its post-backward) has nothing to reduce. The engine then reduce-scatters the rank's
  full-size *clipped* sum into the parameter's shard (:func:`add_clipped_sum_to_shard`:
  ``DTensor(Partial(sum)) -> Shard(0)``, a sum, never an average), so ``p.grad`` holds the sum over all ranks of
  clipped sums for this rank's rows.
* **Noise once per coordinate.** Each rank adds ``N(0, (sigma C)^2)`` to its *local* shard only
  (:class:`~hf_ewtune.noise.DPOptimizer` with sharded parameters), from a rank-distinct seed; shards do not overlap
  and cover every coordinate, so each coordinate is noised exactly once. Nothing all-reduces afterwards.
* **Division by the public expected batch** ``q N``, as without sharding.
* **Lockstep.** FSDP2 all-gathers parameters in every forward, so every rank must run the same number of
  forwards and backwards. A rank whose Poisson slice is empty runs :func:`zero_weight_loss` on a dummy row
  (its loss is multiplied by 0: the clipped contribution is exactly zero) instead of skipping.

``DPTrainer`` uses the same pieces under ``Trainer``'s ``fsdp=True, fsdp_config={"version": 2}`` / accelerate's FSDP
plugin with ``fsdp_version: 2`` (``tests/test_fsdp_trainer.py``): an empty Poisson slice, or fewer physical chunks
than another rank (:func:`max_over_ranks`), runs zero-weight dummy rows.

Unsupported (refused with an error naming them): FSDP1 (``FullyShardedDataParallel``, accelerate's
``fsdp_version: 1``), FSDP CPU offload (``offload_policy=CPUOffloadPolicy``, ``fsdp_offload_params``), FSDP's own
activation checkpointing (DeepSpeed ZeRO-1/2: :mod:`hf_ewtune.distributed.deepspeed_zero`; see docs/distributed.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..noise_draw import add_gaussian_noise_

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover - very old torch
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (an FSDP2-sharded parameter)."""
    return DTensor is not None and isinstance(p, DTensor)


def check_fsdp2_model(model: nn.Module) -> None:
    """Refuse the sharding set-ups the DP contract does not cover (before any training).

    Raises:
        UnsupportedModuleError: FSDP1 wrappers, FSDP2 CPU offload, or sharding other than ``Shard(0)``.
    """
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise UnsupportedModuleError(
                f"{name or '<root>'} is wrapped in FSDP1 (FullyShardedDataParallel), which reduce-scatters the raw "
                "gradients inside backward. Use FSDP2 (torch.distributed.fsdp.fully_shard) instead.")
        state = getattr(module, "_get_fsdp_state", None)
        if state is not None:
            policy = getattr(getattr(state(), "_fsdp_param_group", None), "offload_policy", None)
            if policy is not None and type(policy).__name__ == "CPUOffloadPolicy":
                raise UnsupportedModuleError(
                    f"{name or '<root>'} uses FSDP2 CPU offload (CPUOffloadPolicy), which DP training does not "
                    "support yet (the clipped sums and noise are added on the device). Drop offload_policy.")
    for name, p in model.named_parameters():
        if p.requires_grad and is_sharded(p) and any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements):
            raise UnsupportedModuleError(
                f"Parameter {name!r} is sharded with placements {p.placements}; DP training supports FSDP2's "
                "default Shard(0) only.")


@torch.no_grad()
def add_clipped_sum_to_shard(p: torch.Tensor, clipped_sum: torch.Tensor) -> None:
    """Sum the ranks' full-size clipped sums and add this rank's rows to ``p.grad`` (a collective: all ranks call it).

    Args:
        p: An FSDP2-sharded parameter (``DTensor``, ``Shard(0)``).
        clipped_sum: This rank's ``sum_i c_i g_i`` over its own examples, full (unsharded) shape.
    """
    full = clipped_sum.to(dtype=p.dtype, device=p.to_local().device).reshape(p.shape).contiguous()
    summed = DTensor.from_local(full, p.device_mesh, [Partial("sum")] * p.device_mesh.ndim, run_check=False,
                                shape=p.shape, stride=full.stride())
    shard = summed.redistribute(p.device_mesh, p.placements)  # reduce-scatter (sum) into FSDP2's row layout
    if p.grad is None:
        p.grad = shard
    else:
        p.grad.to_local().add_(shard.to_local())


def zero_weight_loss(per_example_loss: torch.Tensor) -> torch.Tensor:
    """A dummy row's loss times 0: run a rank's forward/backward in lockstep with a contribution of exactly zero."""
    return per_example_loss * 0.0


def local_noise_(grad: Any, *, std: float, generator: torch.Generator) -> None:
    """Add ``N(0, std^2)`` to the local shard of a sharded gradient (in place)."""
    local = grad.to_local()
    if local.numel() == 0:
        return
    add_gaussian_noise_(local, std=std, generator=generator)


def max_over_ranks(count: int, *, device: torch.device) -> int:
    """The largest ``count`` over all ranks (``count`` itself without a process group).

    Under FSDP2 every rank must run the same number of forwards per micro-batch; a rank with fewer physical
    chunks (or an empty Poisson slice) pads with zero-weight dummy rows up to this number.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    if torch.distributed.get_world_size() == 1:
        return count
    if torch.distributed.get_backend() != "nccl":
        device = torch.device("cpu")
    t = torch.tensor([count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def full_state_dict_resume_problem(plugin: Any, args: Any) -> str | None:
    """Why FSDP2 checkpoints saved with ``FULL_STATE_DICT`` could not be resumed from, or ``None``.

    torch's full-state-dict optimizer load (``set_optimizer_state_dict``, which accelerate's ``load_fsdp_optimizer``
    calls) needs at least one tensor in the optimizer's own state to find the device, and plain SGD (momentum 0)
    keeps none: resuming fails with ``AssertionError: Expected device to be set``
    (torch/distributed/checkpoint/state_dict.py; the same with plain ``torch.optim.SGD``, on any device). Saving
    works; ``SHARDED_STATE_DICT`` checkpoints resume.

    Args:
        plugin: accelerate's ``FullyShardedDataParallelPlugin``.
        args: The ``TrainingArguments``.

    Returns:
        The message to show, or ``None`` when the checkpoints resume.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> full = NS(state_dict_type="StateDictType.FULL_STATE_DICT")
        >>> full_state_dict_resume_problem(full, NS(optim="adamw_torch", optim_args=None)) is None
        True
        >>> "SHARDED_STATE_DICT" in full_state_dict_resume_problem(full, NS(optim="sgd", optim_args=None))
        True
        >>> full_state_dict_resume_problem(full, NS(optim="sgd", optim_args="momentum=0.9")) is None
        True
    """
    if "FULL_STATE_DICT" not in str(getattr(plugin, "state_dict_type", "")):
        return None
    if str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", ""))) != "sgd":
        return None
    options = dict(kv.split("=", 1) for kv in str(getattr(args, "optim_args", None) or "").replace(" ", "").split(",")
                   if "=" in kv)
    if float(options.get("momentum", 0.0)) != 0.0:
        return None
    return ("FSDP2 with fsdp_config['state_dict_type'] = FULL_STATE_DICT and plain SGD (optim='sgd', momentum 0): "
            "checkpoints are saved, but torch cannot load a full optimizer state dict of an optimizer without "
            "state tensors, so resume_from_checkpoint will fail ('Expected device to be set'). To resume, use "
            "fsdp_config={'state_dict_type': 'SHARDED_STATE_DICT'} or an optimizer with state (AdamW, SGD with "
            "momentum).")
