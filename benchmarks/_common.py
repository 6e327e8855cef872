"""Small helpers shared by the benchmark scripts: resident-memory probes, forked probes, statistics.

Peak memory on CPU: ``tracemalloc`` does not see torch's allocations, so we read the kernel's own
accounting. On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the process's peak resident set
size (``VmHWM`` in ``/proc/self/status``); the peak a piece of code adds is ``VmHWM`` after it minus
``VmRSS`` before it. Where ``clear_refs`` is not writable we fall back to ``ru_maxrss`` (which cannot be
reset, so the delta can be an underestimate if loading the model peaked higher than training).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import traceback
from typing import Any, Callable, Sequence

_MB = 1024.0


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process; ``True`` if that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    """Resident set size now, in MiB."""
    kb = _status_kb("VmRSS")
    if kb is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _MB
    return kb / _MB


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start), in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return kb / _MB


def release_freed_memory_immediately(threshold: int = 65536) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (and ``munmap`` it
    on free), so that the resident set size follows the bytes actually live instead of keeping freed tensors
    in the heap. ``True`` if ``mallopt(M_MMAP_THRESHOLD)`` succeeded (glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3; also disables its dynamic raise
    except (OSError, AttributeError):
        return False


def _child(conn, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report every failure to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


def run_forked(fn: Callable[..., Any], *args: Any, timeout: float = 1800.0) -> Any:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result; raise ``RuntimeError`` on failure.

    Fork only before the parent has run any multi-threaded torch operation (OpenMP is not fork-safe
    once its thread pool exists): the benchmark forks its memory probes before it builds any model.
    """
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        proc.join()
        raise RuntimeError(f"forked probe timed out after {timeout:.0f} s")
    try:
        status, payload = parent.recv()
    except EOFError as exc:
        proc.join()
        raise RuntimeError(f"forked probe died (exit code {proc.exitcode}; out of memory?)") from exc
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def cpu_load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"
