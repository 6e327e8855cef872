"""One way to start a 2-process test launch on CPU (gloo) and fail it clearly: :func:`run_process_group` (any
launcher, e.g. ``accelerate launch`` in ``test_distributed.py``) and :func:`torchrun_two` (``torchrun --standalone``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_process_group(cmd: list[str], *, env: dict[str, str], timeout_s: float, what: str) -> tuple[int, str]:
    """Run a multi-process launch command in its own session; return its exit status and combined output.

    Kills the whole process group and fails the test when it runs past ``timeout_s`` (a rank stuck in a collective).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"{what} run hung (> {timeout_s} s): a rank is stuck in a collective.\n{text[-4000:]}")
    return proc.returncode, text


def torchrun_two(script: str, *args: str, what: str, timeout_s: float, extra_env: dict[str, str] | None = None,
                 drop_env: tuple[str, ...] = (), log_path: str | None = None) -> str:
    """Run ``script`` on 2 processes offline (one OpenMP thread each, no GPU) and return its combined output.

    Kills the whole process group and fails the test when it runs past ``timeout_s`` (a rank stuck in a
    collective); asserts exit status 0, showing the error lines and the output's tail otherwise.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.update(extra_env or {})
    for var in drop_env:
        env.pop(var, None)
    returncode, text = run_process_group(cmd, env=env, timeout_s=timeout_s, what=f"{what} 2-process")
    if log_path is not None:
        with open(log_path, "w") as fh:
            fh.write(text)
    errors = [line for line in text.splitlines() if "Error" in line and "Warning" not in line]
    assert returncode == 0, "\n".join(errors[:20]) + "\n...\n" + text[-6000:]
    return text
