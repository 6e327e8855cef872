"""Per-example gradients of ``nn.LayerNorm``: weight ``sum_t G * x_hat``, bias ``sum_t G`` (instantiated; tiny)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Record, Rule, compute_dtype, tensor_arg


class LayerNormRule(Rule):
    name = "layer_norm"

    def capture(self, engine, module, args, kwargs, output):
        x = tensor_arg(args, kwargs, "input")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None, None
        return Record(module, self, x.detach(), [output]), None

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        module = rec.module
        shape = tuple(module.normalized_shape)
        x, g = rec.data, rec.grads[0]
        cd = compute_dtype(x, g)
        b = rec.batch_size
        g = g.to(cd).reshape(b, -1, *shape)
        if role == "bias":
            return g.sum(1)
        x_hat = F.layer_norm(x.to(cd), shape, eps=module.eps).reshape(b, -1, *shape)
        return (g * x_hat).sum(1)


def is_plain_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
