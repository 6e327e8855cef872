"""What the 2-process Trainer launchers (``tests/ddp``, ``tests/fsdp``, ``tests/zero``) share: this process's rank,
a barrier, and resuming a finished run from its ``checkpoint-2`` in a fresh trainer."""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def resume_from_checkpoint_2(trainer: Any, build: Any, name: str, world: int, workdir: str, out_dir: str,
                             result: dict[str, Any]) -> tuple[Any, str]:
    """Copy the finished run's ``checkpoint-2`` aside, resume a fresh ``build(name, world, dir)`` trainer from it,
    and record both runs' accountant state, steps and epsilon in ``result``; returns the resumed trainer and the
    checkpoint's path."""
    import warnings

    result["uninterrupted"] = trainer.privacy_callback.accountant.state_dict()
    result["uninterrupted_epsilon"] = float(trainer.get_privacy_spent().epsilon)
    ckpt = os.path.join(workdir, f"{name}-w{world}-stopped", "checkpoint-2")
    if rank() == 0:
        shutil.copytree(os.path.join(out_dir, "checkpoint-2"), ckpt, dirs_exist_ok=True)
    barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = build(name, world, os.path.join(workdir, f"{name}-w{world}-resumed"))
        resumed.train(resume_from_checkpoint=ckpt)
    result["checkpoint_files"] = sorted(os.listdir(ckpt))
    result["resumed"] = resumed.privacy_callback.accountant.state_dict()
    result["resumed_steps"] = resumed.privacy_callback.steps
    result["resumed_global_step"] = resumed.state.global_step
    result["resumed_epsilon"] = float(resumed.get_privacy_spent().epsilon)
    return resumed, ckpt
