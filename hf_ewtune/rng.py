"""Torch generators seeded from several integers, one full-entropy stream per combination.

``torch.Generator().manual_seed(s)`` on CPU (mt19937) keeps only the low 32 bits of ``s``: there are 2^32 CPU
streams, whatever the seed's width. A generator reseeded at every step from a derived 63-bit seed (the noise of
step ``t`` from ``(base_seed, t)``) therefore repeats an earlier step's whole noise draw with probability about
``steps^2 / 2^33`` (1.2% over 10,000 steps), and two steps with the same noise release the exact difference of
their clipped gradient sums: no Gaussian mechanism at all for that pair. :func:`seeded_generator` fills the
whole mt19937 state (624 words) from numpy's ``SeedSequence`` of the integers instead, as numpy's own ``MT19937``
does, so distinct integer tuples give unrelated streams (collisions ~2^-128). CUDA generators (Philox) use all 64
bits of a seed and get the 63-bit :func:`hf_ewtune.sampling.derive_seed`.

Example:
    >>> import torch
    >>> a, b = seeded_generator(torch.device("cpu"), 7, 0), seeded_generator(torch.device("cpu"), 7, 2**32)
    >>> torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))  # manual_seed would make these equal
    False
    >>> torch.equal(torch.randn(4, generator=seeded_generator(torch.device("cpu"), 7, 0)),
    ...             torch.randn(4, generator=seeded_generator(torch.device("cpu"), 7, 0)))
    True
"""

from __future__ import annotations

import struct

import numpy as np
import torch

_MT_WORDS = 624
# Layout of torch's CPU generator state (CPUGeneratorImplState): initial seed (u64), left (i32), seeded (i32),
# next (u64), the 624 mt19937 words (each a u64), then the cached normal samples (40 bytes, zero = none cached).
_STATE_BYTES = 24 + 8 * _MT_WORDS + 40
_WORDS_AT = 24


def _seed_sequence(parts: tuple[int, ...]) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) % (2**63) for p in parts])


def _cpu_state(parts: tuple[int, ...]) -> torch.Tensor:
    seq = _seed_sequence(parts)  # generate_state is a pure function of the sequence: two calls, one pool
    words = seq.generate_state(_MT_WORDS, dtype=np.uint32).astype(np.uint64)
    words[0] |= np.uint64(0x80000000)  # never the all-zero state (as numpy's MT19937 seeding does)
    head = struct.pack("<QiiQ", int(seq.generate_state(1, dtype=np.uint64)[0]) >> 1, 1, 1, 0)
    state = head + words.astype("<u8").tobytes() + bytes(40)  # left = 1, next = 0: the first draw twists
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def seeded_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` whose stream is fixed by the integers ``parts`` (all of their bits).

    Args:
        device: Where the generator draws (CPU: full mt19937 state; other devices: 63-bit seed).
        *parts: Integers (e.g. base seed, step index, a stream tag), each taken modulo 2^63.

    Raises:
        RuntimeError: torch's CPU generator state has a layout this module does not know (a torch upgrade):
            better to stop than to fall back to 32-bit seeding.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    if device.type != "cpu":
        from hf_ewtune.sampling import derive_seed

        gen.manual_seed(derive_seed(*parts))
        return gen
    if gen.get_state().numel() != _STATE_BYTES:
        raise RuntimeError(
            f"torch's CPU generator state has {gen.get_state().numel()} bytes, not {_STATE_BYTES}: hf_ewtune cannot "
            "seed it with a full mt19937 state on this torch version (manual_seed keeps only 32 bits).")
    state = _cpu_state(parts)
    gen.set_state(state)
    if not torch.equal(gen.get_state()[_WORDS_AT:_WORDS_AT + 8 * _MT_WORDS], state[_WORDS_AT:_WORDS_AT + 8 * _MT_WORDS]):
        raise RuntimeError("torch's CPU generator did not take the mt19937 state hf_ewtune set (unknown layout).")
    return gen


__all__ = ["seeded_generator"]
