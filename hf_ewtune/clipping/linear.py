"""Per-example gradients of ``nn.Linear`` and GPT-2's ``Conv1D`` (``y = x @ W + b``, ``W`` is ``[in, out]``).

Per call, the cheapest exact way to the norms (``B`` examples of ``T`` tokens):

1. **Instantiate and keep** ``g_i = G_i^T A_i`` when it is no larger than the call's ``A`` and ``G``
   (:func:`keep_fits`: ``d_in d_out <= T (d_in + d_out)`` in like dtypes). The instantiation costs the same
   multiply-adds as the clipped-sum GEMM it replaces (the clipped sum is then ``sum_i c_i g_i``, one pass), so
   the norms cost nothing extra. This is every LoRA factor, and every layer of a Llama at long sequences (Q/O of
   1B widths from ``T = 1024``, all from ``T = 1639``). Decided in the forward, it happens *during* the backward
   (:class:`_KeepInBackward`): the output gradient is used as it arrives and never stored, and the input is saved
   by autograd, so under activation checkpointing it is recomputed instead of held by the engine. A call whose
   batch size the forward did not know keeps after the backward instead, from the recorded ``A`` and ``G``.
2. Otherwise the ghost identity ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>`` when ``2 T^2 < d_in d_out`` (the
   symmetric Grams computed from the blocks of their lower triangle, :func:`gram_blocks`), else instantiation for
   the norm only; the clipped sum is then one GEMM ``(c * G)^T A`` over all tokens.

The Gram matrix ``A A^T`` (``B T^2`` floats) of an input shared by several layers (Q/K/V, gate/up) is computed
once per backward and freed after its last reader (:func:`note_gram_readers`), so at most the Grams of one input
are alive at a time instead of one per distinct input of the whole model (``2 L + 1`` for a Llama of ``L`` layers
at long sequences, where ghost norms are picked for the MLP).
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch import nn

from ._base import Record, Rule, compute_dtype, squared_norms, storage_key, tensor_arg


_GRAM_READERS = "gram_readers"


def note_gram_readers(shared: dict, uses: list[tuple[Record, str]]) -> None:
    """Count, per recorded input, how many weight norms of ``uses`` may read its Gram matrix.

    :meth:`LinearRule.norm_sq` then drops a cached Gram matrix from ``shared`` once its last reader is done. Without
    this note (e.g. the per-unit merged records of :mod:`.groups`) the cache lives as long as ``shared``.
    """
    shared[_GRAM_READERS] = Counter(rec.key for rec, role in uses if isinstance(rec.rule, LinearRule) and role == "weight")


#: Sequence length from which a Gram matrix is computed as blocks of its lower triangle (:func:`gram_blocks`).
GRAM_SPLIT_MIN_T = 128
_GRAM_BLOCK_T = 256  # target rows per block from T = 2 * 256 on (at most 4 blocks: 10 of 16 block products)


def gram_block_count(t: int) -> int:
    """How many pieces ``T`` is cut into for :func:`gram_blocks`: 1 below :data:`GRAM_SPLIT_MIN_T`, then 2, and
    ``T // 256`` (at most 4) from ``T = 768``, so that each block product stays a large GEMM.

    Example:
        >>> [gram_block_count(t) for t in (64, 128, 512, 1024, 4096)]
        [1, 2, 2, 4, 4]
    """
    if t < GRAM_SPLIT_MIN_T:
        return 1
    return min(4, max(2, t // _GRAM_BLOCK_T))


def gram_blocks(x: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """The weighted blocks that determine the Gram matrix ``x x^T`` (``[B, T, T]``) of ``x`` (``[B, T, d]``).

    ``x x^T`` is symmetric: with ``x`` cut into ``k`` pieces ``x_1 .. x_k`` along ``T`` (:func:`gram_block_count`)
    it is fixed by the products ``x_i x_j^T`` for ``j <= i``; the blocks above the diagonal are their transposes,
    so an off-diagonal block has weight 2 in :func:`gram_inner`. That is ``(k + 1) / (2 k)`` of the full product's
    multiply-adds (3/4 for ``k = 2``, 5/8 for ``k = 4``). The ghost norms' Grams are ~10% of the multiply-adds of
    a 1B-width full fine-tuning step at B T = 1024 (~20% at B T = 2048).

    Example:
        >>> x = torch.randn(2, 1030, 4, dtype=torch.float64)
        >>> full = x @ x.transpose(1, 2)
        >>> torch.allclose(gram_inner(gram_blocks(x), gram_blocks(2 * x)), (full * 4 * full).sum((1, 2)))
        True
    """
    t = x.shape[1]
    k = gram_block_count(t)
    cuts = [t * i // k for i in range(k + 1)]
    pieces = [x[:, cuts[i] : cuts[i + 1]] for i in range(k)]
    return [(1.0 if i == j else 2.0, torch.bmm(pieces[i], pieces[j].transpose(1, 2)))
            for i in range(k) for j in range(i + 1)]


def gram_inner(p: list[tuple[float, torch.Tensor]], q: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Per-example Frobenius inner product ``<P, Q>`` (``Tensor[B]``) of two Grams given by :func:`gram_blocks` of
    inputs with the same ``T`` (an off-diagonal block counts twice: once for itself, once for its transpose)."""
    if len(p) != len(q):  # pragma: no cover - the same T gives the same blocks
        raise ValueError("Gram blocks of different sequence lengths")
    total = None
    for (w, pb), (_, qb) in zip(p, q):
        term = (pb * qb).sum((1, 2))
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    return total


#: How much larger than a call's ``A`` and ``G`` its kept per-example gradient may be (:func:`keep_fits`).
KEEP_FACTOR = 1.0


def keep_fits(t: int, d_in: int, d_out: int, *, a_bytes: int = 4, g_bytes: int = 4, pe_bytes: int = 4) -> bool:
    """Whether one example's gradient (``d_in d_out`` values of ``pe_bytes``) is no larger than its ``A`` and ``G``
    (``T`` tokens of ``d_in`` values of ``a_bytes`` and ``d_out`` of ``g_bytes``), so keeping it instead of them
    costs no memory.

    Example:
        >>> keep_fits(1024, 2048, 2048), keep_fits(1024, 2048, 8192), keep_fits(2048, 2048, 8192)
        (True, False, True)
        >>> keep_fits(1024, 2048, 2048, a_bytes=2, g_bytes=2)  # bf16 activations, float32 gradient
        False
    """
    return d_in * d_out * pe_bytes <= KEEP_FACTOR * t * (d_in * a_bytes + d_out * g_bytes)


def use_ghost(t: int, d_in: int, d_out: int) -> bool:
    """Ghost norm (cost ~T^2 (d_in + d_out)) beats instantiation (~T d_in d_out) when 2 T^2 < d_in d_out."""
    return 2 * t * t < d_in * d_out


class LinearRule(Rule):
    """``nn.Linear`` (weight ``[out, in]``); with ``transposed=True`` GPT-2 ``Conv1D`` (weight ``[in, out]``)."""

    def __init__(self, *, transposed: bool = False) -> None:
        self.transposed = transposed
        self.name = "conv1d" if transposed else "linear"

    def capture(self, engine, module, args, kwargs, output):
        x = tensor_arg(args, kwargs, "x" if self.transposed else "input")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None, None
        if self._keeps_in_backward(engine, x, output):
            token = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            rec = Record(module, self, None, [token], eager=True)
            tapped = _KeepInBackward.apply(output, x, token, self, rec)
            rec.stop_nodes = [tapped.grad_fn]
            return rec, tapped
        return Record(module, self, x.detach(), [output], key=storage_key(x)), None

    def _keeps_in_backward(self, engine, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether this call's per-example gradient is built during the backward, as its output gradient arrives
        (:func:`keep_fits`, batch-first ``[B, ..., d]`` input and output; not in a reentrant checkpoint's
        recomputation, whose records the engine catches differently)."""
        b = getattr(engine, "current_batch_size", None)
        if not b or x.dim() < 2 or x.shape[0] != b or out.shape[0] != b or not keeps_during_backward(engine):
            return False
        d_in, d_out = x.shape[-1], out.shape[-1]
        t = x.numel() // (b * d_in)
        return t > 1 and keep_fits(t, d_in, d_out, a_bytes=x.element_size(), g_bytes=out.element_size(),
                                   pe_bytes=compute_dtype(x, out).itemsize)

    def keep_from(self, rec: Record, x: torch.Tensor, g: torch.Tensor) -> None:
        """Build and keep the per-example gradient (weight and bias) of call ``rec`` from its input and output
        gradient (called from the backward); a second arrival (a graph that reaches the call twice) adds up."""
        b = g.shape[0]
        cd = compute_dtype(x, g)
        self._keep(rec, x.detach().reshape(b, -1, x.shape[-1]).to(cd), g.reshape(b, -1, g.shape[-1]).to(cd))

    # -- helpers ---------------------------------------------------------------------------------------
    def _ag(self, rec: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """A [B, T, d_in] and G [B, T, d_out] in the compute dtype."""
        a, g = rec.data, rec.grads[0]
        cd = compute_dtype(a, g)
        b = rec.batch_size
        return a.reshape(b, -1, a.shape[-1]).to(cd), g.reshape(b, -1, g.shape[-1]).to(cd)

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        if rec.data is None and role in rec.cache:  # kept (A and G let go)
            return rec.cache[role]
        a, g = self._ag(rec)
        return g.sum(1) if role == "bias" else self._weight_per_example(a, g)

    def factors(self, rec: Record, role: str):
        if rec.data is None:  # kept (see norm_sq): A and G are gone, the cached per-example gradient stands in
            return None
        a, g = self._ag(rec)
        if role == "bias":
            return ("dense", g, torch.ones(*g.shape[:2], 1, dtype=g.dtype, device=g.device))
        return ("dense", a, g) if self.transposed else ("dense", g, a)

    def norm_sq(self, rec: Record, role: str) -> torch.Tensor:
        if role in rec.cache:  # the bias, kept with the weight's per-example gradient
            pe = rec.cache[role]
            return squared_norms(pe)
        a, g = self._ag(rec)
        if role == "bias":
            return g.sum(1).pow(2).sum(1)
        t = a.shape[1]
        shared = rec.shared if rec.shared is not None else {}
        readers = shared.get(_GRAM_READERS)
        if readers is not None:
            readers[rec.key] -= 1
        if t == 1:
            return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
        if keep_fits(t, a.shape[2], g.shape[2], a_bytes=rec.data.element_size(),
                     g_bytes=rec.grads[0].element_size(), pe_bytes=a.element_size()):
            return self._keep_per_example(rec, role, a, g)
        if use_ghost(t, a.shape[2], g.shape[2]):
            gram_key = ("gram", rec.key, a.dtype)  # Q/K/V (and LoRA A) share their input: one A A^T for all
            aa = shared.get(gram_key)
            if aa is None:
                aa = gram_blocks(a)
            if readers is None or readers[rec.key] > 0:
                shared[gram_key] = aa  # a later layer reads the same input
            else:
                shared.pop(gram_key, None)  # the last reader: free it as soon as this norm is done
            return gram_inner(aa, gram_blocks(g))
        pe = self.per_example(rec, role)  # larger than A and G: not kept; the clipped sum is a GEMM over them
        return squared_norms(pe)

    def _keep_per_example(self, rec: Record, role: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Instantiate the weight's per-example gradient, keep it (and the bias's) for the clipped sum, and let go
        of ``A`` and ``G`` (nothing else reads them; an input shared with Q/K/V lives while another call holds it)."""
        self._keep(rec, a, g)
        rec.data, rec.grads = None, [None] * len(rec.grads)
        return squared_norms(rec.cache[role])

    def _weight_per_example(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[B, out, in]`` (``[B, in, out]`` for a transposed Conv1D) from A ``[B, T, in]`` and G ``[B, T, out]``."""
        return torch.bmm(a.transpose(1, 2), g) if self.transposed else torch.bmm(g.transpose(1, 2), a)

    def _keep(self, rec: Record, a: torch.Tensor, g: torch.Tensor) -> None:
        """Add one arrival's per-example gradients of the weight (and a trainable bias) to ``rec.cache``."""
        parts = {"weight": self._weight_per_example(a, g)}
        if getattr(rec.module, "bias", None) is not None and rec.module.bias.requires_grad:
            parts["bias"] = g.sum(1)
        for role, pe in parts.items():
            rec.cache[role] = pe if role not in rec.cache else rec.cache[role] + pe

    def clipped_sum(self, rec: Record, role: str, c: torch.Tensor) -> torch.Tensor:
        if role in rec.cache:
            return super().clipped_sum(rec, role, c)
        a, g = self._ag(rec)
        cv = c.to(g.dtype).view(-1, 1, 1)
        if role == "bias":
            return (g * cv).sum((0, 1))
        if a.shape[-1] < g.shape[-1]:  # scale the narrower operand
            a = a * cv
        else:
            g = g * cv
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        return a2.t() @ g2 if self.transposed else g2.t() @ a2


def keeps_during_backward(engine) -> bool:
    """Whether calls recorded now may keep their per-example gradient during the backward: a normal forward or a
    non-reentrant checkpoint's recomputation (which must repeat the first forward's graph exactly), not a
    reentrant recomputation."""
    from .checkpointing import in_nonreentrant_recompute

    return getattr(engine, "_capture", None) is None or in_nonreentrant_recompute()


class _KeepInBackward(torch.autograd.Function):
    """Identity on a Linear's output whose backward builds the call's per-example gradient from the output gradient
    and the input, and keeps it.

    The input is saved with ``save_for_backward``, so under non-reentrant activation checkpointing it is
    recomputed rather than held by the engine, and the output gradient is never stored: the engine holds only the
    per-example gradient (a LoRA factor's is tiny). The gradient flows on unchanged; the input gets none from here.
    ``token`` (0-dim, requires grad) is what the engine asks autograd for, so the backward reaches this node
    without anyone keeping the output gradient. The output is passed on as the same tensor, marked as modified in
    place (no copy; later in-place ops stay legal); a view (``F.linear`` with a bias on 3-D input, GPT-2's Conv1D)
    is copied instead, so that this node, not a view's ``CopySlices``, stays the output's ``grad_fn``."""

    @staticmethod
    def forward(ctx, out, x, token, rule, rec):
        ctx.save_for_backward(x)
        # A weak reference: the record holds this node (``stop_nodes``), and a strong one back would be a cycle
        # through the autograd graph that Python's collector cannot see (the whole graph would leak).
        ctx.rule, ctx.rec = rule, weakref.ref(rec)
        if out._base is not None:
            return out.clone()
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        rec = ctx.rec()
        if rec is not None:  # else the engine dropped the record (a recomputed forward's own graph)
            ctx.rule.keep_from(rec, x, g)
        return g, None, torch.zeros((), dtype=g.dtype, device=g.device), None, None


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(module, Conv1D) and type(module).forward is Conv1D.forward
