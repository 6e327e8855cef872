"""Adding Gaussian noise to a gradient in place, in cache-sized float32 chunks.

Every coordinate gets an independent ``N(0, std^2)`` draw made in float32 (also for bf16/fp16 gradients: the sum
is computed in float32 and rounded once), from the given ``torch.Generator``, once per call.

On CPU the draw goes through one reusable buffer of :data:`NOISE_CHUNK` floats (128 KiB) instead of one
full-size temporary per parameter: a fresh multi-MB temporary costs an ``mmap`` and a page fault per 4 KiB on
every step, while the chunk stays in cache for the addition (and the optional division, which then needs no
second pass over the gradient). The chunk is just below ATen's parallel grain (32,768 elements), so the
addition and division run on the calling thread: no OpenMP fork/join per piece, which on a loaded machine cost
more than the draw itself. (The draw is serial anyway: one generator.) At 1B-class widths (95M parameters)
this halved the noise step (``benchmarks/README.md``). ``torch``'s CPU ``normal_`` fills
the uniforms of a contiguous float32 tensor in order and transforms them in blocks of 16 (Box-Muller), redrawing
the last 16 when the size is not a multiple of 16; the chunks are multiples of 16 and the last one holds at
least 16 values, so the noise is bit for bit the one-shot ``torch.normal(0, std, size=t.shape)`` draw from the
same generator state (``tests/test_noise_draw.py`` checks it). On other devices it is that one-shot draw.

A CPU tensor of at least :data:`SEGMENT_MIN` floats is cut into up to :data:`MAX_SEGMENTS` segments, each drawn
from its own generator, in parallel threads (``torch.get_num_threads()`` of them; ATen releases the GIL). torch's
CPU draw is serial per generator (~4.5 ns a float here), so one generator would cap the noise step at one core;
at 1B-class widths it was 5% of a 2-core DP step, and more on machines with more cores. Each segment's generator
gets a full mt19937 state from 126 bits drawn from ``generator`` (:mod:`hf_ewtune.rng`): the noise is a function
of the generator state and the tensor's size only, never of the thread count, and the segments are independent
streams (the same argument as for steps).

Example:
    >>> import torch
    >>> t = torch.zeros(3, 5)
    >>> add_gaussian_noise_(t, std=2.0, generator=torch.Generator().manual_seed(0))
    >>> ref = torch.normal(0.0, 2.0, size=(3, 5), generator=torch.Generator().manual_seed(0))
    >>> torch.equal(t, ref)
    True
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from hf_ewtune.rng import seeded_generator

#: Floats per CPU draw: a multiple of 16 below ATen's parallel grain size (32,768).
NOISE_CHUNK = (1 << 15) - 16
#: A CPU tensor of at least this many floats is drawn in segments with their own generators, in parallel.
SEGMENT_MIN = 1 << 21
#: At most this many segments per tensor (fixed: the noise must not depend on the machine's thread count).
MAX_SEGMENTS = 16
_BLOCK = 16  # torch's CPU normal_ transforms uniforms in blocks of 16 (and redraws a ragged tail of 16)


def chunk_bounds(n: int, chunk: int = NOISE_CHUNK) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces of ``range(n)``: all but the last of length ``chunk``, the last at least 16 long
    (a short remainder joins the piece before it), so that drawing piece by piece equals one draw of ``n``.

    Example:
        >>> chunk_bounds(40, 16)
        [(0, 16), (16, 40)]
        >>> chunk_bounds(10, 16)
        [(0, 10)]
    """
    if chunk <= 0 or chunk % _BLOCK:
        raise ValueError(f"chunk must be a positive multiple of {_BLOCK}, got {chunk}.")
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < _BLOCK:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


@torch.no_grad()
def add_gaussian_noise_(
    tensor: torch.Tensor,
    *,
    std: float,
    generator: torch.Generator,
    divide_by: float | None = None,
    chunk: int = NOISE_CHUNK,
) -> None:
    """Add ``N(0, std^2)`` (drawn in float32) to every coordinate of ``tensor`` in place, then divide by
    ``divide_by`` if given.

    Args:
        tensor: The gradient (any floating dtype; a plain tensor, not a ``DTensor``).
        std: Standard deviation of the noise (``sigma * sensitivity``).
        generator: The generator to draw from (on ``tensor``'s device).
        divide_by: Optional public constant to divide the noisy tensor by (the expected batch size).
        chunk: Floats per CPU draw (a multiple of 16; tests use small ones).
    """
    n = tensor.numel()
    if n == 0:
        return
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        noise = torch.normal(0.0, std, size=tensor.shape, generator=generator, device=tensor.device,
                             dtype=torch.float32)
        tensor.add_(noise)
        if divide_by is not None:
            tensor.div_(divide_by)
        return
    flat = tensor.view(-1)
    segments = segment_bounds(n)
    if len(segments) == 1:
        _draw_into(flat, std=std, generator=generator, divide_by=divide_by, chunk=chunk)
        return
    # 126 bits per segment from the caller's generator: a full-state stream each (hf_ewtune.rng)
    words = torch.randint(0, 2**63 - 1, (len(segments), 2), generator=generator).tolist()
    gens = [seeded_generator("cpu", hi, lo) for hi, lo in words]
    jobs = [(flat[a:b], g) for (a, b), g in zip(segments, gens)]
    workers = min(len(jobs), max(1, torch.get_num_threads()))
    if workers == 1:
        for piece, g in jobs:
            _draw_into(piece, std=std, generator=g, divide_by=divide_by, chunk=chunk)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(_draw_into, piece, std=std, generator=g, divide_by=divide_by, chunk=chunk)
                       for piece, g in jobs]:
            future.result()


def segment_bounds(n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` segments of ``range(n)`` drawn from separate generators: one below :data:`SEGMENT_MIN`,
    else ``min(MAX_SEGMENTS, n // 2^20)`` nearly equal ones (a function of ``n`` only).

    Example:
        >>> segment_bounds(1000)
        [(0, 1000)]
        >>> [b - a for a, b in segment_bounds(3 * 2**20)]
        [1048576, 1048576, 1048576]
    """
    if n < SEGMENT_MIN:
        return [(0, n)]
    k = min(MAX_SEGMENTS, n >> 20)
    cuts = [n * i // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _draw_into(flat: torch.Tensor, *, std: float, generator: torch.Generator, divide_by: float | None,
               chunk: int) -> None:
    """The chunked draw of one contiguous 1-D piece from one generator (bit for bit one ``torch.normal``)."""
    bounds = chunk_bounds(flat.numel(), chunk)
    buf = torch.empty(max(b - a for a, b in bounds), dtype=torch.float32)
    with torch.no_grad():
        for start, stop in bounds:
            piece = flat[start:stop]
            piece.add_(buf[: stop - start].normal_(0.0, std, generator=generator))
            if divide_by is not None:
                piece.div_(divide_by)
