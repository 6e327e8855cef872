"""Per-example gradients of RMSNorm layers: weight ``sum_t G * x_hat`` with ``x_hat = x / rms(x)``.

Covers ``torch.nn.RMSNorm`` and the ``*RMSNorm`` classes of transformers (Llama, SmolLM, Mistral, Qwen2,
Gemma's ``(1 + weight)`` form, ...), which all scale ``x * rsqrt(mean(x^2) + eps)`` elementwise by a
function of a 1-D ``weight`` whose derivative is 1. Because a wrong formula would silently break the
clipping bound, a module is only given this rule after a **self-check**: on a float64 copy with a random
weight, its per-example weight gradients from autograd must match the closed form; any module that fails
(another formula, a bias, an unknown epsilon attribute) keeps the exact torch.func fallback.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._base import Record, Rule, compute_dtype, tensor_arg

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def rms_eps(module: nn.Module, dtype: torch.dtype) -> float | None:
    """The epsilon of an RMSNorm module (``torch.nn.RMSNorm(eps=None)`` uses the dtype's machine epsilon)."""
    for attr in _EPS_ATTRS:
        if hasattr(module, attr):
            value = getattr(module, attr)
            if value is None and isinstance(module, nn.RMSNorm):
                return torch.finfo(dtype).eps
            return float(value) if isinstance(value, (int, float)) else None
    return None


def x_hat(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps)`` in float32 (float64 for float64 input)."""
    x = x.to(compute_dtype(x))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNormRule(Rule):
    name = "rms_norm"

    def capture(self, engine, module, args, kwargs, output):
        x = tensor_arg(args, kwargs, "hidden_states" if "hidden_states" in kwargs else "x")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None, None
        return Record(module, self, x.detach(), [output]), None

    def per_example(self, rec: Record, role: str) -> torch.Tensor:
        x, g = rec.data, rec.grads[0]
        eps = rms_eps(rec.module, x.dtype)
        cd = compute_dtype(x, g)
        h = x.shape[-1]
        b = rec.batch_size
        return (g.to(cd).reshape(b, -1, h) * x_hat(x, eps).to(cd).reshape(b, -1, h)).sum(1)


def is_rms_norm_candidate(module: nn.Module) -> bool:
    """An ``nn.RMSNorm`` or a class named ``*RMSNorm`` whose only own trainable parameter is a 1-D ``weight``."""
    if not (isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")):
        return False
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if [n for n, _ in own] != ["weight"] or own[0][1].dim() != 1 or any(True for _ in module.children()):
        return False
    return rms_eps(module, torch.float32) is not None


def passes_self_check(module: nn.Module) -> bool:
    """Whether the closed form equals autograd's per-example weight gradient on a float64 copy of ``module``."""
    try:
        probe = copy.deepcopy(module).to(torch.float64)
        h = probe.weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(h, generator=gen, dtype=torch.float64))
        x = torch.randn(2, 3, h, generator=gen, dtype=torch.float64) * 3.0
        g = torch.randn(2, 3, h, generator=gen, dtype=torch.float64)
        eps = rms_eps(probe, torch.float64)
        for i in range(2):
            probe.zero_grad(set_to_none=True)
            (probe(x[i:i + 1]) * g[i:i + 1]).sum().backward()
            expected = (g[i] * x_hat(x[i], eps)).sum(0)
            # The forward may compute in float32 (Llama casts): a wrong formula is off by O(1), not 1e-5.
            if probe.weight.grad is None or not torch.allclose(probe.weight.grad, expected, rtol=1e-4, atol=1e-5):
                return False
        return True
    except Exception:  # any surprise: keep the exact fallback
        return False
