"""``ClippingEngine``: one backward pass, per-example norms, clipped sum written into ``p.grad``.

Book-keeping scheme (Bu et al., "Differentially Private Optimization on Large Model at Small Cost"):

1. Forward hooks on the *original* modules record each call's input ``A`` and output tensor (only when grad
   is enabled and the module is in training mode).
2. ``backward`` runs a single ``torch.autograd.grad`` of ``sum_i loss_i`` with respect to the recorded
   *outputs* only, so autograd never computes (nor accumulates) the unclipped parameter gradients.
3. Per parameter, per-example norms come from ghost identities or instantiation (see the rule modules);
   parameters used more than once (tied GPT-2 ``lm_head``/``wte``, a module called twice) are instantiated
   as the sum over uses, so the norm includes the cross terms.
4. Clipping factors are computed from all norms, then ``sum_i c_i g_i`` is built per parameter and added to
   ``p.grad`` (created if ``None``) in the parameter's dtype. Norms and sums are computed in float32 (or
   float64 for float64 models), also under bf16 autocast.

Non-finite per-example gradients: an example whose gradient norm is not finite gets a clipping factor of 0
and its stored activations/gradients are zeroed, so its contribution to ``p.grad`` is exactly zero; its
returned norm stays non-finite so the caller can report it.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import Counter
from typing import Iterator

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..checks import CLIPPING_STYLES, check_choice, check_max_grad_norm
from ..distributed.fsdp import add_clipped_sum_to_shard, check_fsdp2_model, is_sharded
from ..errors import UnsupportedModuleError
from ._base import Record, Rule, factor_inner
from .checkpointing import (RecomputeCapture, catch_output_grads, check_leaks, in_nonreentrant_recompute,
                            is_reentrant_checkpoint_node, raw_gradient_guard)
from .functorch_fallback import direct_trainable
from .groups import UnitLayout, unit_norms_sq
from .linear import note_gram_readers
from .relative_bias import RELATIVE_BIAS_RULE, RelativeBiasRule, layout_error, relative_bias_tables, wrap_compute_bias
from .validation import batch_mixing_problem, choose_rule, model_problems, raise_problems

FLAT_EPS = 1e-6
AUTO_GAMMA = 0.01
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "attention_mask")
# Attribute on the model: a weak reference to the engine whose hooks are on it (no module-level registry, so
# nothing here keeps a model or an engine alive; the hooks themselves hold the engine while attached).
_ATTACHED = "_hf_ewtune_clipping_engine"


def _total(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more tensors; a single one is returned as is (``sum()`` would start from ``0`` and copy
    every clipped sum, a full extra pass over all parameters per step)."""
    total = None
    for t in tensors:
        total = t if total is None else total + t
    if total is None:  # pragma: no cover - every use list is non-empty
        raise ValueError("nothing to sum")
    return total


def attached_engine(model: nn.Module) -> "ClippingEngine | None":
    """The :class:`ClippingEngine` whose hooks are currently on ``model`` (``None`` if there is none).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> attached_engine(model) is None
        True
        >>> engine = ClippingEngine(model, max_grad_norm=1.0)
        >>> attached_engine(model) is engine
        True
        >>> engine.remove()
        >>> attached_engine(model) is None
        True
    """
    ref = model.__dict__.get(_ATTACHED)
    engine = ref() if ref is not None else None
    return engine if engine is not None and engine.attached else None


class ClippingEngine:
    """Per-example gradient clipping for a model, with hooks on its own modules (no wrapper).

    Args:
        model: The model to train. Every parameter with ``requires_grad`` must be covered by a rule
            (Linear, GPT-2 Conv1D, Embedding, LayerNorm, T5-style relative attention bias, or the torch.func
            fallback).
        max_grad_norm: Clipping norm ``C`` (> 0).
        clipping: ``"flat"`` (``c_i = min(1, C/(||g_i|| + 1e-6))``), ``"per_layer"`` (each module's group of
            parameters clipped at ``C/sqrt(L)``, ``L`` = number of trainable modules) or ``"automatic"``
            (AUTO-S: ``c_i = C/(||g_i|| + 0.01)``). The sensitivity is ``C`` for all three.

    Raises:
        PrivacyConfigError: invalid ``max_grad_norm`` or ``clipping``.
        UnsupportedModuleError: a trainable parameter no rule covers, BatchNorm, a trainable
            ``relative_attention_bias`` whose owner has no ``compute_bias``.

    Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not, e.g. Hugging Face's
    ``gradient_checkpointing_enable()``) is supported: see :mod:`hf_ewtune.clipping.checkpointing`.

    Example:
        >>> import torch
        >>> from hf_ewtune.clipping import ClippingEngine
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> engine = ClippingEngine(model, max_grad_norm=1.0)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> norms = engine.backward(((model(x) - y) ** 2).squeeze(1))
        >>> norms.shape, engine.sensitivity
        (torch.Size([8]), 1.0)
        >>> engine.remove()
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, clipping: str = "flat") -> None:
        check_max_grad_norm(max_grad_norm)
        check_choice(clipping, CLIPPING_STYLES, name="clipping")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.clipping = clipping
        problems = model_problems(model)
        check_fsdp2_model(model)

        self._params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise UnsupportedModuleError("The model has no trainable parameter (requires_grad=True); nothing to clip.")
        self._index_parameters()

        self._rules: dict[nn.Module, Rule] = {}
        bias_tables, bias_problems = relative_bias_tables(model)
        problems += bias_problems
        covered: set[int] = set()
        for name, module in model.named_modules():
            roles = direct_trainable(module)
            if not roles or batch_mixing_problem(name, module) is not None:
                continue  # no parameters of its own, or already reported by model_problems
            try:
                self._rules[module] = RELATIVE_BIAS_RULE if module in bias_tables else choose_rule(name, module)
            except UnsupportedModuleError as exc:  # collect them all: one error lists every unsupported module
                problems.append(str(exc))
                continue
            covered.update(id(getattr(module, r)) for r in roles)
        raise_problems(list(dict.fromkeys(problems)))
        missing = [n for n, p in self._params.items() if id(p) not in covered]
        if missing:  # pragma: no cover - every parameter is owned by some module
            raise UnsupportedModuleError(f"Trainable parameters {missing} are not covered; freeze them.")

        self._records: list[Record] = []
        self._suspend = 0
        self._capture: RecomputeCapture | None = None  # set while the engine's own backward runs
        self.current_batch_size: int | None = None
        self._pending_bias: dict[nn.Module, tuple] = {}  # table -> (bucket ids, looked-up values) of its last call
        self._bias_batch: dict[nn.Module, int] = {}  # compute_bias owner -> batch size of its current call
        #: What would reduce raw parameter gradients across ranks if a full backward ran (``"DeepSpeed ZeRO"``, set
        #: by the DeepSpeed paths, whose reduce hooks sit on ``AccumulateGrad``): reentrant checkpointing, which
        #: needs a full backward, is then refused as it is for FSDP2-sharded parameters.
        self.raw_gradients_reduced_by: str | None = None
        self._handles = [m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self._rules]
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        for owner in dict.fromkeys(bias_tables.values()):
            self._handles.append(owner.register_forward_pre_hook(self._bias_owner_pre_hook, with_kwargs=True))
            self._handles.append(owner.register_forward_hook(self._bias_owner_post_hook))
            self._handles.append(wrap_compute_bias(owner, self))
        model.__dict__[_ATTACHED] = weakref.ref(self)

    # -- public API --------------------------------------------------------------------------------
    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one example's clipped contribution (``C`` for every clipping style)."""
        return self.max_grad_norm

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model (``False`` after :meth:`remove`)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove all hooks and drop any recorded activations (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = []
        self._pending_bias = {}
        self._bias_batch = {}
        ref = self.model.__dict__.get(_ATTACHED)
        if ref is not None and ref() is self:
            del self.model.__dict__[_ATTACHED]

    def clear(self) -> None:
        """Drop activations recorded by forwards that will not be followed by ``backward``."""
        self._records = []

    def backward(self, per_example_loss: torch.Tensor, *, units: torch.Tensor | None = None) -> torch.Tensor:
        """One backward pass; add ``sum_i c_i g_i`` into ``p.grad`` of every trainable parameter.

        Args:
            per_example_loss: ``Tensor[B]``, example ``i``'s loss only, from the forward just run.
            units: Optional ``Tensor[B]`` of privacy-unit (user) ids: rows with the same id are ONE unit, whose
                summed gradient is clipped to ``C`` as a whole (user-level DP, see :mod:`.groups`). ``None``:
                every row is its own unit.

        Returns:
            The (pre-clip) total gradient norms per unit: ``Tensor[B]`` per example, or ``Tensor[U]`` per unit
            in increasing id order when ``units`` is given (detached, float32/64).
        """
        records, uses, b = self._run_backward(per_example_loss)
        try:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params.values()) else torch.float32
            device = per_example_loss.device
            layout = None
            if units is not None:
                if not isinstance(units, torch.Tensor) or units.shape != (b,):
                    raise ValueError(f"units must be a Tensor[{b}] (one unit id per row of per_example_loss), "
                                     f"got {getattr(units, 'shape', type(units))}.")
                layout = UnitLayout(units.to(device))
            norm_sq: dict[int, torch.Tensor] = {}
            pe_sum: dict[int, torch.Tensor] = {}
            merged = layout is not None and not layout.singletons
            if records and records[0].shared is not None:  # free each Gram matrix after its last reader
                note_gram_readers(records[0].shared, [plist[0] for plist in uses.values() if len(plist) == 1])
            if merged:
                norm_sq, pe_sum = unit_norms_sq(uses, layout, dtype)
            for pid, plist in (() if merged else uses.items()):
                if len(plist) == 1:
                    rec, role = plist[0]
                    norm_sq[pid] = rec.rule.norm_sq(rec, role).to(dtype)
                else:  # tied / reused: the norm of the SUM over uses, cross terms included
                    facs = [rec.rule.factors(rec, role) for rec, role in plist]
                    if all(f is not None for f in facs):
                        n2 = 0
                        for u in range(len(facs)):
                            n2 = n2 + factor_inner(facs[u], facs[u])
                            for v in range(u + 1, len(facs)):
                                n2 = n2 + 2 * factor_inner(facs[u], facs[v])
                        norm_sq[pid] = n2.to(dtype)
                    else:  # instantiate the per-example gradient summed over uses
                        pe = _total(rec.rule.cached_per_example(rec, role).to(dtype) for rec, role in plist)
                        pe_sum[pid] = pe
                        norm_sq[pid] = pe.reshape(b, -1).pow(2).sum(1)
            cols = layout.num_units if merged else b
            group_sq = torch.zeros(self.num_groups, cols, dtype=dtype, device=device)
            for pid, n2 in norm_sq.items():
                # Ghost identities are exact inner products of PSD matrices; clamp rounding below zero (NaN stays NaN).
                group_sq[self._group_of[pid]] += n2.clamp(min=0)
            if layout is not None and layout.singletons:  # one row per unit: its norm IS the example's norm
                group_sq = torch.zeros(self.num_groups, layout.num_units, dtype=dtype, device=device).index_add_(
                    1, layout.index, group_sq)
            total = group_sq.sum(0).sqrt()
            keep = torch.isfinite(total)
            factors = self._factors(group_sq, total, keep)  # [groups, B or U] or [1, B or U]
            if layout is not None:  # every row of a unit gets its unit's factor: sum_u c_u g_u = sum_i c_u(i) g_i
                factors, keep = layout.to_rows(factors), layout.to_rows(keep)
            if not bool(keep.all()):
                for rec in records:
                    rec.rule.mask_examples(rec, keep)
                pe_sum = {k: torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v, 0) for k, v in pe_sum.items()}
            if records and records[0].shared is not None:
                records[0].shared.clear()  # Gram matrices: only the norms read them
            # A record's A, G and kept gradients are let go once the last of its parameters' sums is built, so the
            # sums grow while the records shrink (holding both in full was the DP step's memory peak).
            pending = Counter(id(rec) for plist in uses.values() for rec, _ in plist)
            sums = []  # all computed before any p.grad is touched: an error leaves p.grad unchanged
            for pid, plist in uses.items():
                c = factors[self._group_of[pid] if factors.shape[0] > 1 else 0]
                if pid in pe_sum:
                    s = torch.tensordot(c, pe_sum.pop(pid), dims=1)
                else:
                    s = _total(rec.rule.clipped_sum(rec, role, c) for rec, role in plist)
                sums.append((self._params[self._param_name[pid]], s))
                for rec, _ in plist:
                    pending[id(rec)] -= 1
                    if not pending[id(rec)]:
                        rec.release()
            records.clear()
            uses.clear()
            for p, s in sums:
                self._add_grad(p, s)
            for pid_name, p in self._params.items():
                if id(p) not in uses and p.grad is None:
                    p.grad = torch.zeros_like(p)
            return total.detach()
        finally:
            records.clear()

    def per_example_gradients(self, per_example_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Materialised per-example gradients ``{name: Tensor[B, *p.shape]}`` (tests/debugging; no ``p.grad``)."""
        records, uses, b = self._run_backward(per_example_loss)
        out: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            plist = uses.get(id(p), [])
            if plist:
                out[name] = sum(rec.rule.per_example(rec, role) for rec, role in plist).to(p.dtype)
            else:
                out[name] = torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device)
        records.clear()
        return out

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Context in which the hooks record nothing (used for the torch.func recomputation)."""
        self._suspend += 1
        try:
            yield
        finally:
            self._suspend -= 1

    # -- internals ---------------------------------------------------------------------------------
    def _index_parameters(self) -> None:
        self._param_name = {id(p): n for n, p in self._params.items()}
        # Group for per-layer clipping: the module that owns the parameter under its canonical name.
        owners = sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in self._params})
        self._group_of = {id(p): owners.index(n.rsplit(".", 1)[0] if "." in n else "") for n, p in self._params.items()}
        self.num_groups = len(owners)
        # FSDP2: parameters are DTensor shards outside a module's forward/backward (rules must read values then).
        self.sharded = any(is_sharded(p) for p in self._params.values())

    def _follow_replaced_parameters(self) -> None:
        """Re-index if the model's parameters were replaced since the engine was built (``fully_shard`` applied
        later, e.g. by accelerate's ``prepare``); called after a backward, when FSDP2 has resharded them."""
        current = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if current.keys() == self._params.keys() and all(current[n] is p for n, p in self._params.items()):
            return
        if current.keys() != self._params.keys():
            raise UnsupportedModuleError(
                "The model's trainable parameters changed after the ClippingEngine was built (added, removed or "
                f"frozen: {sorted(set(current) ^ set(self._params))[:5]}). Build the engine after setting them.")
        self._params = current
        self._index_parameters()
    def _recording(self, module: nn.Module) -> bool:
        return not self._suspend and module.training and torch.is_grad_enabled()

    def _root_pre_hook(self, module, args, kwargs):
        if not self._recording(module):
            return None
        for key in _BATCH_KEYS:
            t = kwargs.get(key)
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                self.current_batch_size = int(t.shape[0])
                return None
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                self.current_batch_size = int(t.shape[0])
                return None
        return None

    def _forward_hook(self, module, args, kwargs, output):
        if not self._recording(module):
            return None
        rule = self._rules[module]
        rec, new_out = rule.capture(self, module, args, kwargs, output)
        if rec is not None:
            self._record(rec)
        return new_out

    def _record(self, rec: Record) -> None:
        """Keep the record of one module call (from a forward hook or a wrapped ``compute_bias``)."""
        if self._capture is not None:  # a checkpointed block recomputed inside backward
            if not in_nonreentrant_recompute():  # reentrant: the first forward recorded nothing (no_grad)
                self._capture.add(rec)
            return  # non-reentrant: the first forward's record stands; nothing recorded twice
        # Keep only the autograd edges: holding the output tensors would keep every layer's output alive
        # (memory), and an edge also gives the gradient of the *original* value if it is later modified in place.
        rec.edges = [get_gradient_edge(t) for t in rec.outputs]
        rec.out_meta = [(t.shape, t.dtype, t.device) for t in rec.outputs]
        rec.outputs = None
        self._records.append(rec)

    def _bias_owner_pre_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1:
            self._bias_batch[module] = int(hidden.shape[0])
        else:
            self._bias_batch.pop(module, None)
        return None

    def _bias_owner_post_hook(self, module, args, output):
        self._bias_batch.pop(module, None)  # a compute_bias call outside the forward must not see a stale size
        return None

    def _relative_bias_output(self, owner: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """``owner.compute_bias``'s output, expanded to the batch in training mode and recorded when grad is on
        (see :mod:`.relative_bias`)."""
        table = getattr(owner, "relative_attention_bias", None)
        pending = self._pending_bias.pop(table, None)
        if (not isinstance(self._rules.get(table), RelativeBiasRule) or self._suspend or not table.training
                or not isinstance(out, torch.Tensor)):
            return out
        b = self._bias_batch.get(owner)
        if b is None:
            if pending is not None:
                raise UnsupportedModuleError(
                    f"{type(owner).__name__}.compute_bias was called outside its module's forward (no batch size "
                    "known), so the per-example gradients of its relative_attention_bias cannot be separated. "
                    "Freeze the table: relative_attention_bias.weight.requires_grad_(False).")
            return out
        label = type(owner).__name__
        if pending is not None:
            ids, values = pending
            index = RelativeBiasRule.table_index(out, values, ids, label)
        elif out.dim() == 0 or out.shape[0] != 1:
            raise layout_error(label, out)
        expanded = out.expand(b, *out.shape[1:])
        if pending is not None and torch.is_grad_enabled():
            self._record(Record(table, self._rules[table], {"index": index}, [expanded]))
        return expanded

    def _run_backward(self, per_example_loss: torch.Tensor) -> tuple[list[Record], dict[int, list], int]:
        if not isinstance(per_example_loss, torch.Tensor) or per_example_loss.dim() != 1:
            raise ValueError("per_example_loss must be a 1-D Tensor[B] of per-example losses "
                             f"(got {getattr(per_example_loss, 'shape', type(per_example_loss))}).")
        records, self._records = self._records, []
        b = per_example_loss.shape[0]
        if not per_example_loss.requires_grad:
            raise ValueError("per_example_loss does not require grad: run the forward with grad enabled, "
                             "in train() mode, with the ClippingEngine attached.")
        targets, owners = [], []
        shared: dict = {}
        for ri, rec in enumerate(records):
            rec.shared = shared
            for k, edge in enumerate(rec.edges):
                targets.append(edge)
                owners.append((ri, k))
            rec.grads = [None] * len(rec.edges)
            rec.batch_size = b
        total_loss = per_example_loss.sum()
        reentrant_nodes = self._check_coverage(
            total_loss, targets, [n for rec in records for n in (rec.stop_nodes or ())])
        reducer = "FSDP2" if reentrant_nodes and any(is_sharded(p) for p in self.model.parameters()) else (
            self.raw_gradients_reduced_by)
        if reentrant_nodes and reducer:
            raise UnsupportedModuleError(
                f"reentrant activation checkpointing (use_reentrant=True) with {reducer}"
                f"{'-sharded parameters' if reducer == 'FSDP2' else ''}: torch refuses autograd.grad through "
                f"reentrant blocks, and the full backward that replaces it makes {reducer} reduce the raw, unclipped "
                "parameter gradients across ranks. Use non-reentrant checkpointing (gradient_checkpointing_kwargs="
                "{'use_reentrant': False}, Hugging Face's default).")
        self._capture = RecomputeCapture(records, batch_size=b, shared=shared)
        try:
            with raw_gradient_guard(self._params) as leaked:
                if reentrant_nodes:  # torch refuses autograd.grad through them: full backward, raw grads discarded
                    catch_output_grads(records, owners)
                    torch.autograd.backward(total_loss)
                elif targets:
                    grads = torch.autograd.grad(total_loss, targets, allow_unused=True)
                    for (ri, k), g in zip(owners, grads):
                        records[ri].grads[k] = g
        finally:
            self._capture = None
        self._follow_replaced_parameters()
        uses: dict[int, list[tuple[Record, str]]] = {}
        for rec in records:
            if not rec.active:
                continue
            for g, (shape, _, _) in zip(rec.grads, rec.out_meta):
                if g is not None and not rec.eager and (g.dim() == 0 or g.shape[0] != b):
                    raise UnsupportedModuleError(
                        f"The output of {type(rec.module).__name__} has leading dimension "
                        f"{tuple(shape[:1])} instead of the batch size {b} (broadcast over the batch?); its "
                        "per-example gradients cannot be separated. Freeze it, or pass batch-sized inputs.")
            for role in direct_trainable(rec.module):
                p = getattr(rec.module, role)
                if id(p) in self._param_name:
                    uses.setdefault(id(p), []).append((rec, role))
        check_leaks(leaked, {self._param_name[pid] for pid in uses})
        return records, uses, b

    def _check_coverage(self, loss: torch.Tensor, targets: list, extra_stops: list = ()) -> list:
        """Walk the autograd graph from the loss; return the reentrant checkpoint nodes in it.

        Up to the recorded module outputs, reaching a trainable parameter means it was used outside its module's
        forward (e.g. ``F.linear(x, other.weight)`` in a parent), where no hook sees it and its gradient would be
        silently dropped: that raises. Past them the walk only looks for reentrant checkpoints."""
        stop = {edge.node for edge in targets} | set(extra_stops)
        seen: set = set()
        stack = [(loss.grad_fn, True)]
        reentrant = []
        while stack:
            node, check = stack.pop()
            if node is None or (node, check) in seen:
                continue
            seen.add((node, check))
            check = check and node not in stop
            if is_reentrant_checkpoint_node(node):
                reentrant.append(node)
            var = getattr(node, "variable", None)
            if check and var is not None and id(var) in self._param_name:
                name = self._param_name[id(var)]
                raise UnsupportedModuleError(
                    f"Trainable parameter {name!r} is used outside the forward of the module that owns it (or by a "
                    "module call the engine did not record), so its per-example gradient cannot be captured. "
                    "Freeze it, or make the code call its module instead of using the tensor directly.")
            stack.extend((nxt, check) for nxt, _ in node.next_functions)
        return list(dict.fromkeys(reentrant))

    def _factors(self, group_sq: torch.Tensor, total: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        c_norm = self.max_grad_norm
        if self.clipping == "flat":
            f = (c_norm / (total + FLAT_EPS)).clamp(max=1.0).unsqueeze(0)
        elif self.clipping == "automatic":
            f = (c_norm / (total + AUTO_GAMMA)).unsqueeze(0)
        else:
            c_l = c_norm / math.sqrt(self.num_groups)
            f = (c_l / (group_sq.sqrt() + FLAT_EPS)).clamp(max=1.0)
        return torch.where(keep.unsqueeze(0), f, torch.zeros((), dtype=f.dtype, device=f.device))

    @staticmethod
    def _add_grad(p: nn.Parameter, s: torch.Tensor) -> None:
        if is_sharded(p):  # FSDP2: sum the ranks' clipped sums into this rank's shard (reduce-scatter)
            add_clipped_sum_to_shard(p, s)
            return
        s = s.to(dtype=p.dtype, device=p.device).reshape(p.shape)
        if p.grad is None:
            p.grad = s.contiguous()
        else:
            p.grad.add_(s)
