"""The oracle for per-example gradients: one backward per example, in float64, against the clipping engine.

Use :func:`check_per_example_gradients` before training a new architecture (or a layer with your own
:func:`~hf_ewtune.clipping.register_clipping_rule`): the privacy guarantee holds only if the engine's
per-example gradients are the true ones. It is the same loop the library's own tests use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class GradientCheck:
    """Result of :func:`check_per_example_gradients`.

    Attributes:
        ok: Every per-example gradient and the clipped sum match the one-example-at-a-time loop.
        max_abs_error: Largest absolute difference over all per-example gradients.
        clipped_sum_max_abs_error: Largest absolute difference of the clipped sum ``sum_i c_i g_i``.
        errors: ``{parameter name: max abs error}`` of the per-example gradients.
        rules: ``{module name: rule class name}`` the engine used.
    """

    ok: bool
    max_abs_error: float
    clipped_sum_max_abs_error: float
    errors: dict[str, float] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)

    @property
    def worst_parameter(self) -> str | None:
        """The parameter with the largest per-example gradient error (``None`` if there is none)."""
        return max(self.errors, key=self.errors.get) if self.errors else None


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """DPTrainer's default per-example loss: forward without ``labels``, loss from the logits and the labels."""
    from hf_ewtune.loss_contract import pop_labels
    from hf_ewtune.losses import infer_task, per_example_loss

    inputs = dict(batch)
    labels = pop_labels(inputs)
    out = model(**inputs)
    logits = out["logits"] if isinstance(out, Mapping) else out[0]
    return per_example_loss(logits, labels, task=infer_task(model, logits, labels),
                            attention_mask=inputs.get("attention_mask"))


def slice_batch(batch: Any, i: int, batch_size: int) -> Any:
    """Example ``i`` of ``batch`` (tensors with leading dimension ``batch_size`` become ``[1, ...]``)."""
    from hf_ewtune.loss_contract import slice_example

    return slice_example(batch, i, batch_size)


def loop_per_example_gradients(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Ground truth: one backward per example. ``{name: Tensor[B, *param.shape]}`` for trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = _batch_size(batch)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(b):
        loss = loss_fn(model, slice_batch(batch, i, b)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def check_per_example_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    max_grad_norm: float = 1.0,
    clipping: str = "flat",
    atol: float = 1e-8,
    rtol: float = 1e-6,
    raise_on_mismatch: bool = True,
) -> GradientCheck:
    """Compare the clipping engine's per-example gradients with one backward per example, in float64.

    Works on a float64 deep copy of ``model`` (the model itself is not changed), in training mode with
    ``nn.Dropout`` layers switched off (the two computations must see the same forward). Checks both the
    materialised per-example gradients and the clipped sum that training adds into ``p.grad``.

    Args:
        model: The model, as you will train it (frozen parameters frozen, adapters attached), without
            ``DPTrainer`` hooks (check before building the trainer, or call ``trainer.remove_hooks()``).
        batch: A few examples (e.g. 2-4): a dict of tensors, or whatever ``loss_fn`` takes; tensors whose
            first dimension is the batch size are split per example.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, each example's loss. Default: ``DPTrainer``'s loss
            from the logits and ``batch["labels"]``.
        max_grad_norm: Clipping norm for the clipped-sum check (small values exercise clipping).
        clipping: ``"flat"``, ``"per_layer"`` or ``"automatic"``.
        atol: Absolute tolerance (float64).
        rtol: Relative tolerance (float64).
        raise_on_mismatch: Raise ``AssertionError`` (naming the worst parameter) instead of returning ``ok=False``.

    Returns:
        A :class:`GradientCheck`.

    Raises:
        ValueError: the model still carries a clipping engine's hooks.
        AssertionError: a mismatch, when ``raise_on_mismatch``.
        UnsupportedModuleError: the engine cannot handle the model at all.

    Example:
        >>> import torch
        >>> from hf_ewtune.testing import check_per_example_gradients
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> batch = {"x": torch.randn(3, 4), "y": torch.randn(3, 1)}
        >>> loss = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).squeeze(1)
        >>> check_per_example_gradients(model, batch, loss).ok
        True
    """
    from hf_ewtune.clipping import ClippingEngine, attached_engine

    if attached_engine(model) is not None:
        raise ValueError(
            "check_per_example_gradients: the model carries a clipping engine's hooks; check it before building "
            "the DPTrainer, or call trainer.remove_hooks() first."
        )
    loss_fn = loss_fn or default_loss
    work = copy.deepcopy(model).to(torch.float64).train()
    for m in work.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    batch = _to_float64(batch)
    engine = ClippingEngine(work, max_grad_norm=max_grad_norm, clipping=clipping)
    try:
        names = {m: n for n, m in work.named_modules()}
        rules = {names[m] or "<root>": type(r).__name__ for m, r in engine._rules.items()}
        per_ex = engine.per_example_gradients(loss_fn(work, batch))
        with engine.suspended():
            truth = loop_per_example_gradients(work, batch, loss_fn)
        errors = {n: float((per_ex[n] - truth[n]).abs().max()) if truth[n].numel() else 0.0 for n in truth}
        ok = all(torch.allclose(per_ex[n], truth[n], atol=atol, rtol=rtol) for n in truth)
        for p in work.parameters():
            p.grad = None
        engine.backward(loss_fn(work, batch))
        expected = _clipped_sum(engine, truth)
        sum_err = 0.0
        for n, p in work.named_parameters():
            if n in expected:
                sum_err = max(sum_err, float((p.grad - expected[n]).abs().max()))
                ok = ok and torch.allclose(p.grad, expected[n], atol=atol, rtol=rtol)
    finally:
        engine.remove()
    result = GradientCheck(ok=ok, max_abs_error=max(errors.values(), default=0.0), clipped_sum_max_abs_error=sum_err,
                           errors=errors, rules=rules)
    if raise_on_mismatch and not ok:
        raise AssertionError(
            f"per-example gradients do not match the one-example-at-a-time loop: worst parameter "
            f"{result.worst_parameter!r} (max abs error {result.max_abs_error:.3g}; clipped sum "
            f"{sum_err:.3g}; rules used: {rules}). Training this model would not clip what it claims to."
        )
    return result


def _clipped_sum(engine: Any, truth: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sum_i c_i g_i`` from the true per-example gradients, with the engine's clipping factors."""
    names = list(truth)
    b = truth[names[0]].shape[0]
    sq = {n: truth[n].reshape(b, -1).pow(2).sum(1) for n in names}
    params = dict(engine.model.named_parameters())
    group_sq = torch.zeros(engine.num_groups, b, dtype=torch.float64)
    for n in names:
        group_sq[engine._group_of[id(params[n])]] += sq[n]
    factors = engine._factors(group_sq, group_sq.sum(0).sqrt(), torch.ones(b, dtype=torch.bool))
    out = {}
    for n in names:
        c = factors[engine._group_of[id(params[n])] if factors.shape[0] > 1 else 0]
        out[n] = torch.tensordot(c, truth[n], dims=1)
    return out


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    raise ValueError("batch holds no tensor with a batch dimension.")


def _to_float64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(torch.float64) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_float64(v) for v in batch)
    return batch
