"""torch.func fallback for any other module that directly owns trainable parameters (RMSNorm, custom layers).

The hook keeps the call's inputs; after the backward pass the module is re-run per example with
``vmap(grad(functional_call))`` against the recorded output gradient, which gives the per-example gradient
of the module's *own* parameters (children are treated as constants and covered by their own rules).

Notes:
    * Tensor arguments whose first dimension equals the batch size are split per example; all others are
      passed whole (e.g. ``[1, T]`` broadcast tensors). A call with no such argument (a position table called
      with a shape: its output is shared by the batch, and a leading dimension that happened to equal the batch
      size would be taken for it) is refused.
    * Learned positional embeddings (``*LearnedPositionalEmbedding``, e.g. BART's decoder, called with ``[T]``
      position ids) return ``[1, T, d]`` shared by the batch: that output is expanded to ``[B, T, d]`` (as the
      embedding rule does for ``[1, T]`` ids), and the call is recomputed on its inputs as they were (nothing
      split: the ``[T]`` position ids must not be taken for a batch when ``T == B``) against each example's own
      gradient.
    * Randomness inside the module (dropout) is re-drawn per example (``randomness="different"``), so with
      active dropout the gradients differ from the forward's masks (still a per-example function: the
      clipping guarantee holds).
    * The autocast state of the forward is restored for the recomputation.
    * A module that is itself an FSDP2 unit (or a member of a grouped unit, e.g. accelerate's tail group
      ``fully_shard([final_norm, embed_tokens, lm_head])``) is re-run through ``module.forward`` with its
      parameters swapped in, bypassing its hooks: calling it would fire FSDP2's pre-forward hook, which
      all-gathers the group again and leaves the group's OTHER modules holding unsharded parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModuleError
from ._base import Record, Rule

_DEVICES = ("cpu", "cuda")


def _is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``module`` carries FSDP2 forward hooks of its own (a ``fully_shard`` unit or group member)."""
    try:
        from torch.distributed._composable_state import _get_module_state
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return _get_module_state(module) is not None


class FunctorchRule(Rule):
    name = "functorch"

    def __init__(self, roles: list[str], *, expand_broadcast: bool = False) -> None:
        self.roles = roles
        self.expand_broadcast = expand_broadcast

    def capture(self, engine, module, args, kwargs, output):
        leaves, out_spec = tree_flatten(output)
        idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not idx:
            return None, None
        new_out = None
        b = engine.current_batch_size
        if self.expand_broadcast and b is not None and b > 1 and any(leaves[i].dim() >= 1 and leaves[i].shape[0] == 1
                                                                     for i in idx):
            # [1, ...] output shared by the batch (position table on [1, T] ids): expand it, so that autograd
            # delivers each example's own gradient (every example's recomputation gives the same [1, ...]).
            leaves = [t.expand(b, *t.shape[1:]) if i in idx and t.dim() >= 1 and t.shape[0] == 1 else t
                      for i, t in enumerate(leaves)]
            new_out = tree_unflatten(leaves, out_spec)
        in_leaves, in_spec = tree_flatten((args, kwargs))
        in_leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in in_leaves]
        autocast = []
        for dev in _DEVICES:
            try:
                autocast.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
            except (RuntimeError, AttributeError):  # pragma: no cover - backend not built
                pass
        data = {"in_leaves": in_leaves, "in_spec": in_spec, "out_idx": idx, "autocast": autocast, "engine": engine,
                "broadcast": new_out is not None}
        known = getattr(engine, "_param_name", {})
        if getattr(engine, "sharded", False) or any(id(getattr(module, r)) not in known for r in self.roles):
            # FSDP2 (the call sees unsharded values, freed after it): keep a copy
            data["params"] = {r: getattr(module, r).detach().clone() for r in self.roles}
        outs = [leaves[i] for i in idx]
        return Record(module, self, data, outs), new_out

    def mask_examples(self, rec: Record, keep: torch.Tensor) -> None:
        rec.grads = [None if g is None else torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, 0) for g in rec.grads]
        rec.cache = {k: torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v, 0) for k, v in rec.cache.items()}

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        self._compute_all(rec)
        return rec.cache[role]

    def _compute_all(self, rec: Record) -> None:
        module, data, b = rec.module, rec.data, rec.batch_size
        in_leaves, in_spec, out_idx = data["in_leaves"], data["in_spec"], data["out_idx"]
        # A broadcast call (expanded [1, ...] output) gives every example the same output: recompute it whole
        # against each example's gradient (splitting an input whose length happens to be B would be wrong).
        batched_pos = [] if data.get("broadcast") else [
            i for i, t in enumerate(in_leaves) if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b]
        if not batched_pos and not data.get("broadcast"):  # e.g. a position table called with a shape only
            raise UnsupportedModuleError(
                f"{type(module).__name__} was called without any batched tensor input (none with leading dimension "
                f"{b}), so its output is shared by every example and the per-example gradients of its parameters "
                f"{self.roles} cannot be separated. Freeze them (requires_grad_(False)).")
        grads = [torch.zeros(sh, dtype=dt, device=dev) if g is None else g for (sh, dt, dev), g in zip(rec.out_meta, rec.grads)]
        params = data.get("params") or {r: getattr(module, r).detach() for r in self.roles}
        fsdp_unit = _is_fsdp_unit(module)

        def loss_fn(p: dict, batched: list, gs: list) -> torch.Tensor:
            leaves = list(in_leaves)
            for pos, t in zip(batched_pos, batched):
                leaves[pos] = t.unsqueeze(0)
            args, kwargs = tree_unflatten(leaves, in_spec)
            if fsdp_unit:  # FSDP2 hooks must not fire again (see the module notes)
                with _reparametrize_module(module, p, strict=False):
                    out = module.forward(*args, **kwargs)
            else:
                out = functional_call(module, p, args, kwargs, strict=False)
            out_leaves, _ = tree_flatten(out)
            total = 0.0
            for j, g in zip(out_idx, gs):
                total = total + (out_leaves[j] * g.unsqueeze(0).to(out_leaves[j].dtype)).sum()
            return total

        ctx = contextlib.ExitStack()
        with ctx:
            for dev, enabled, dtype in data["autocast"]:
                ctx.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
            ctx.enter_context(data["engine"].suspended())
            per_ex = vmap(grad(loss_fn), in_dims=(None, 0, 0), randomness="different")(
                params, [in_leaves[i] for i in batched_pos], grads
            )
        for r in self.roles:
            g = per_ex[r]
            rec.cache[r] = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)


def direct_trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
