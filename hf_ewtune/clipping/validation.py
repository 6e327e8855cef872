"""Model checks done before training and the choice of a per-example gradient rule for each module.

User rules: :func:`register_clipping_rule` adds a rule for a module type (your own layer); it is used for
that type and its subclasses in preference to the built-in rules and the ``torch.func`` fallback.
"""

from __future__ import annotations

from typing import Callable, Union

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


RuleOrFactory = Union[Rule, Callable[[nn.Module], Rule]]
_USER_RULES: dict[type, RuleOrFactory] = {}


def register_clipping_rule(module_type: type, rule: RuleOrFactory) -> None:
    """Use ``rule`` for the per-example gradients of every ``module_type`` (and subclass) instance.

    A rule subclasses :class:`hf_ewtune.clipping.Rule` and implements ``capture`` (what to record in the
    forward) and ``per_example`` (``Tensor[B, *param.shape]`` for one of the module's own trainable
    parameters); ``norm_sq``/``clipped_sum`` may be overridden with cheaper closed forms. Check a new rule
    against :func:`hf_ewtune.testing.check_per_example_gradients` before training with it: the privacy
    guarantee is only as good as the rule. Registering again for the same type replaces the rule.

    Args:
        module_type: An ``nn.Module`` subclass.
        rule: A :class:`Rule` instance, or a callable ``module -> Rule`` (called once per module).

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass, or ``rule`` is neither a Rule nor callable.
        UnsupportedModuleError: ``module_type`` is a BatchNorm or recurrent layer (they mix examples / are
            rejected whatever the rule).

    Example:
        >>> import torch
        >>> from hf_ewtune.clipping import ClippingEngine, register_clipping_rule, unregister_clipping_rule
        >>> from hf_ewtune.clipping.linear import LinearRule
        >>> class MyLinear(torch.nn.Linear):
        ...     def forward(self, x):  # same maths as nn.Linear, written by hand
        ...         return x @ self.weight.t() + self.bias
        >>> register_clipping_rule(MyLinear, LinearRule())
        >>> engine = ClippingEngine(MyLinear(3, 1), max_grad_norm=1.0)
        >>> type(engine._rules[engine.model]).__name__
        'LinearRule'
        >>> engine.remove(); unregister_clipping_rule(MyLinear)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}.")
    if issubclass(module_type, (nn.modules.batchnorm._BatchNorm, nn.RNNBase)):
        raise UnsupportedModuleError(
            f"cannot register a clipping rule for {module_type.__name__}: batch-norm and recurrent layers are "
            "rejected whatever the rule (they mix examples or are not supported).")
    if not isinstance(rule, Rule) and not callable(rule):
        raise TypeError(f"rule must be a hf_ewtune.clipping.Rule instance or a callable module -> Rule, got {rule!r}.")
    _USER_RULES[module_type] = rule


def unregister_clipping_rule(module_type: type) -> None:
    """Remove the rule registered for ``module_type`` (no error if there is none)."""
    _USER_RULES.pop(module_type, None)


def _user_rule(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:  # most specific registered type first
        if cls in _USER_RULES:
            rule = _USER_RULES[cls]
            made = rule if isinstance(rule, Rule) else rule(module)
            if not isinstance(made, Rule):
                raise TypeError(f"the rule factory registered for {cls.__name__} returned {made!r}, not a Rule.")
            return made
    return None


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
    user = _user_rule(module)
    if user is not None:
        return user
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
    if isinstance(module, nn.Embedding) and type(module).__name__.endswith("LearnedPositionalEmbedding"):
        return FunctorchRule(roles, expand_broadcast=True)  # BART's decoder: [1, T] positions
    return FunctorchRule(roles)


# Transformers modules that mix the examples of a batch in their forward (found by class name, so that
# transformers need not be imported): NLLB-MoE's router counts expert capacity over all tokens of the batch,
# so whether one example's token reaches its expert depends on the other examples.
BATCH_MIXING_CLASS_NAMES: dict[str, str] = {
    "NllbMoeTop2Router": "its expert capacity is shared by all tokens of the batch (tokens of one example are "
                         "dropped depending on the other examples). Use a dropless MoE or freeze the MoE layers "
                         "and train another part",
}


def batch_mixing_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` mixes the examples of a batch (or keeps statistics of the data), or ``None``.

    Every ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm*``) is rejected whatever its
    mode, ``track_running_stats`` or ``requires_grad``: ``DPTrainer`` trains in ``train()`` mode, where it
    normalises with the batch statistics, and with ``track_running_stats=False`` it does so in ``eval()`` mode
    too. Then one example's gradient (of every parameter before it) depends on the other examples, and
    clipping no longer bounds one example's influence. ``InstanceNorm`` with ``track_running_stats=True`` does
    not mix examples but accumulates running statistics of the private data into buffers that are saved
    with the model without noise. ``GroupNorm``, ``LayerNorm``, ``RMSNorm`` and ``InstanceNorm`` without running
    statistics normalise each example on its own and are fine.

    Example:
        >>> from torch import nn
        >>> batch_mixing_problem("net.0", nn.GroupNorm(2, 4)) is None
        True
        >>> "GroupNorm" in batch_mixing_problem("net.1", nn.BatchNorm1d(4, track_running_stats=False).eval())
        True
    """
    label = f"{name or '<root>'} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (f"Module {label} is a BatchNorm: it normalises with the statistics of the whole batch (in every "
                "mode when track_running_stats=False, and in train() mode, which DPTrainer uses, always), so one "
                "example's gradient depends on the other examples and per-example clipping does not bound its "
                "influence. Replace it with nn.GroupNorm (e.g. nn.GroupNorm(min(32, C), C)) or nn.LayerNorm, or "
                "remove it, before private training (opacus' ModuleValidator.fix does this replacement).")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return (f"Module {label} has track_running_stats=True: its running mean/variance are statistics of the "
                "private training data, saved with the model without noise. Build it with "
                "track_running_stats=False (or use nn.GroupNorm).")
    reason = BATCH_MIXING_CLASS_NAMES.get(type(module).__name__)
    if reason is not None:
        return f"Module {label} mixes the examples of a batch: {reason}."
    return None


def model_problems(model: nn.Module) -> list[str]:
    """Every whole-model property the engine cannot handle: modules that mix the examples of a batch (see
    :func:`batch_mixing_problem`; wherever they are, whatever their mode or ``requires_grad``). Gradient
    checkpointing is supported (``checkpointing.py``)."""
    return [p for name, m in model.named_modules() if (p := batch_mixing_problem(name, m)) is not None]


def raise_problems(problems: list[str]) -> None:
    """Raise one :class:`UnsupportedModuleError` listing every problem (the message alone if there is one)."""
    if len(problems) == 1:
        raise UnsupportedModuleError(problems[0])
    if problems:
        raise UnsupportedModuleError(
            f"{len(problems)} problems prevent per-example clipping of this model (fix all of them):\n"
            + "\n".join(f"  - {m}" for m in problems))


def check_model(model: nn.Module) -> None:
    """Reject whole-model properties the engine cannot handle (batch statistics).

    Modules that mix the examples of a batch are rejected wherever they are and whatever their mode or
    ``requires_grad`` (see :func:`batch_mixing_problem`): a frozen BatchNorm still makes the gradients of
    the trainable layers before it depend on the other examples.

    Raises:
        UnsupportedModuleError: naming every such module and the fix (one error for all of them).
    """
    raise_problems(model_problems(model))


def is_checkpointing(model: nn.Module) -> bool:
    """Whether Hugging Face gradient (activation) checkpointing is enabled anywhere in ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
