"""Model checks done before training and the choice of a per-example gradient rule for each module."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModuleError
from ._base import Rule
from .embedding import EmbeddingRule, is_plain_embedding
from .functorch_fallback import FunctorchRule, direct_trainable
from .layer_norm import LayerNormRule, is_plain_layer_norm
from .linear import LinearRule, is_conv1d, is_plain_linear

_LINEAR = LinearRule()
_CONV1D = LinearRule(transposed=True)
_EMBEDDING = EmbeddingRule()
_LAYER_NORM = LayerNormRule()


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def choose_rule(name: str, module: nn.Module) -> Rule:
    """The rule that computes per-example gradients of ``module``'s own trainable parameters.

    Raises:
        UnsupportedModuleError: if no rule can cover the module (naming it and the fix).
    """
    label = f"{name or '<root>'} ({type(module).__name__})"
    roles = direct_trainable(module)
    fix = "Freeze it (param.requires_grad_(False)) or replace it with a supported layer."
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(f"Module {label} is a BatchNorm with trainable parameters: it mixes examples. "
                                     "Replace it with GroupNorm/LayerNorm.")
    if isinstance(module, nn.RNNBase):
        raise UnsupportedModuleError(f"Trainable recurrent module {label} is not supported by the clipping engine. {fix}")
    if not _has_forward(module):
        raise UnsupportedModuleError(
            f"Trainable parameters {roles} of {label} belong to a module without its own forward "
            "(e.g. ParameterList/ParameterDict used by a parent), so their per-example gradients cannot be "
            f"captured. {fix} Or move them into a small nn.Module that uses them in its forward.")
    if is_plain_linear(module):
        return _LINEAR
    if is_conv1d(module):
        return _CONV1D
    if is_plain_embedding(module):
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"Embedding {label} has scale_grad_by_freq=True: the gradient scale depends on the whole batch "
                "(mixes examples). Set scale_grad_by_freq=False or freeze it.")
        return _EMBEDDING
    if is_plain_layer_norm(module):
        return _LAYER_NORM
    return FunctorchRule(roles)


def check_model(model: nn.Module) -> None:
    """Reject whole-model properties the engine cannot handle (batch statistics, gradient checkpointing).

    Raises:
        UnsupportedModuleError: naming the module and the fix.
    """
    if any(p.requires_grad for p in model.parameters()):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.track_running_stats or m.training):
                raise UnsupportedModuleError(
                    f"Module {name or '<root>'} ({type(m).__name__}) computes batch statistics, which mixes the "
                    "examples of a batch and breaks per-example clipping. Replace it with GroupNorm/LayerNorm "
                    "(or remove it) before private training.")
    if is_checkpointing(model):
        raise UnsupportedModuleError(
            "Gradient checkpointing is enabled on the model; the recomputed forward is not supported by the "
            "clipping engine. Call model.gradient_checkpointing_disable() before private training.")


def is_checkpointing(model: nn.Module) -> bool:
    """Whether Hugging Face gradient (activation) checkpointing is enabled anywhere in ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
