"""Per-example gradients of T5-style relative attention bias tables (T5, mT5, UMT5, LongT5, Switch, ...).

The table is an ``nn.Embedding`` named ``relative_attention_bias`` whose owner (the attention module) has a
``compute_bias`` method: it looks up ``[query, key]`` position buckets and returns a *view* of the looked-up
values without a batch dimension (``[1, H, q, k]`` for T5, ``[1, 1, H, b, 3b]`` for LongT5's local attention),
which every example's attention scores add (T5 passes block 0's bias on to every later block).

The gradient reaching that ``[1, ...]`` output is the sum over the batch, so while the engine is attached the
owner's ``compute_bias`` is wrapped (on the instance; restored by ``ClippingEngine.remove()``): in training mode
its output is expanded to ``[B, ...]`` (``B`` = the batch dimension of the owner's ``hidden_states``) — a real
``expand``, so autograd delivers at that node each example's own gradient, summed over every layer that uses
the bias. The engine records the expanded output; the embedding's hook stores the bucket ids and records
nothing itself. The per-example gradient of the table then is an ``index_add`` of that ``[B, ...]`` gradient
into the ``(bucket, head)`` entry each element was read from (the map follows the strides of the returned view,
so any rearrangement of the looked-up values is followed exactly; a ``compute_bias`` whose output is not a view
of them is refused).

The expansion also happens under ``no_grad`` in training mode, so the first forward of a *reentrant* gradient
checkpoint passes a batched bias on to the later blocks, as its recomputation does.

A trainable ``relative_attention_bias`` whose owner has no ``compute_bias`` (e.g. MPNet's encoder) is refused by
the engine: its output has no batch dimension, and when its leading dimension happened to equal the batch size
the plain embedding rule would mix the examples.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ._base import Record, Rule, compute_dtype, tensor_arg

TABLE_NAME = "relative_attention_bias"
_ENGINE_ATTR = "_hf_ewtune_bias_engine"  # on the owner: weak reference to the engine that wrapped compute_bias
_ORIGINAL_ATTR = "_hf_ewtune_original_compute_bias"
_HAD_OWN_ATTR = "_hf_ewtune_had_own_compute_bias"


class RelativeBiasRule(Rule):
    """Rule of a ``relative_attention_bias`` table: see the module docstring. ``capture`` stores the bucket ids
    for the owner's wrapped ``compute_bias``, which makes the record of the (expanded) output."""

    name = "relative_bias"

    def capture(self, engine: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            engine._pending_bias[module] = (tensor_arg(args, kwargs, "input").detach(), output)
        return None, None

    @staticmethod
    def table_index(out: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, label: str) -> torch.Tensor:
        """For every element of ``out[0]``, the flat index ``bucket * H + head`` of the table entry it holds.

        Raises:
            UnsupportedModuleError: ``out`` is not a view of the looked-up ``values`` with a leading 1.
        """
        if (out.dim() == 0 or out.shape[0] != 1 or not values.is_contiguous()
                or out.untyped_storage().data_ptr() != values.untyped_storage().data_ptr()
                or out.dtype != values.dtype):
            raise layout_error(label, out)
        heads = values.shape[-1]
        flat = torch.arange(values.numel(), device=values.device)
        pos = flat.as_strided(out.shape, out.stride(), out.storage_offset() - values.storage_offset())[0]
        return ids.reshape(-1)[pos // heads] * heads + pos % heads

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        g = rec.grads[0]
        b = rec.batch_size
        dtype = compute_dtype(g)
        index = rec.data["index"].reshape(-1)
        rows, heads = rec.module.weight.shape
        pe = torch.zeros(b, rows * heads, dtype=dtype, device=g.device)
        pe = pe.index_add_(1, index, g.reshape(b, -1).to(dtype)).view(b, rows, heads)
        if rec.module.padding_idx is not None:  # nn.Embedding never updates its padding row
            pe[:, rec.module.padding_idx] = 0
        return pe


RELATIVE_BIAS_RULE = RelativeBiasRule()


def layout_error(label: str, out: Any) -> UnsupportedModuleError:
    """The error for a ``compute_bias`` whose output is not a ``[1, ...]`` view of its table lookup."""
    return UnsupportedModuleError(
        f"{label}.compute_bias does not return a view of its relative_attention_bias lookup with a leading "
        f"dimension of 1 (got shape {tuple(getattr(out, 'shape', ()))}), so the per-example gradients of the table "
        f"cannot be separated. Freeze it: {label}.relative_attention_bias.weight.requires_grad_(False).")


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def relative_bias_tables(model: nn.Module) -> tuple[dict[nn.Module, nn.Module], list[str]]:
    """The trainable relative position tables of ``model``: ``({table: owner}, problems)``.

    A table is a module named ``relative_attention_bias`` with a trainable parameter of its own. Those that are
    plain ``nn.Embedding`` with an owner that has ``compute_bias`` are supported; every other one is a problem
    (a message naming it and the fix).
    """
    from .embedding import is_plain_embedding

    tables: dict[nn.Module, nn.Module] = {}
    problems: list[str] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != TABLE_NAME:
            continue
        if not any(p is not None and p.requires_grad for p in module._parameters.values()):
            continue
        owner = _owner(model, name)
        if is_plain_embedding(module) and callable(getattr(owner, "compute_bias", None)):
            tables[module] = owner
        else:
            problems.append(
                f"Trainable relative position table {name} ({type(module).__name__}) is used broadcast over the "
                f"batch (shared by every example) and its owner {type(owner).__name__} has no T5-style "
                "compute_bias, so its per-example gradients cannot be separated. Freeze it: "
                f"model.get_submodule({name!r}).requires_grad_(False).")
    return tables, problems


def _expanding_compute_bias(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = self.__dict__[_ORIGINAL_ATTR](*args, **kwargs)
    ref = self.__dict__.get(_ENGINE_ATTR)
    engine = ref() if ref is not None else None
    if engine is None or not engine.attached:
        return out
    return engine._relative_bias_output(self, out)


class CompanionHandle:
    """Undoes :func:`wrap_compute_bias` (``remove()``, like a hook handle), unless a later engine took it over."""

    def __init__(self, owner: nn.Module, engine: Any) -> None:
        self.owner = owner
        self.engine = weakref.ref(engine)

    def remove(self) -> None:
        d = self.owner.__dict__
        ref = d.get(_ENGINE_ATTR)
        if ref is not None and ref() is not None and ref() is not self.engine():
            return  # another engine wrapped it since: its own handle restores it
        if getattr(d.get("compute_bias"), "__func__", None) is _expanding_compute_bias:
            del d["compute_bias"]
            original = d.pop(_ORIGINAL_ATTR)
            if d.pop(_HAD_OWN_ATTR, False):
                d["compute_bias"] = original  # an instance-level compute_bias that was there before the wrapper
        d.pop(_ENGINE_ATTR, None)


def wrap_compute_bias(owner: nn.Module, engine: Any) -> CompanionHandle:
    """Wrap ``owner.compute_bias`` on the instance so that ``engine`` sees (and expands) its output."""
    d = owner.__dict__
    if getattr(d.get("compute_bias"), "__func__", None) is not _expanding_compute_bias:
        d[_HAD_OWN_ATTR] = "compute_bias" in d
        d[_ORIGINAL_ATTR] = owner.compute_bias
        d["compute_bias"] = types.MethodType(_expanding_compute_bias, owner)
    d[_ENGINE_ATTR] = weakref.ref(engine)
    return CompanionHandle(owner, engine)
