"""Per-example gradient clipping engine: hooks on the original modules, one backward pass ("book-keeping").

Coverage (one rule per module type, chosen when the engine is built; anything uncovered raises
:class:`~hf_ewtune.errors.UnsupportedModuleError` before training):

* ``nn.Linear`` (2-D and ``[B, T, d]`` inputs; PEFT LoRA ``lora_A``/``lora_B`` and ``modules_to_save`` copies
  are plain Linears) and GPT-2 ``Conv1D``: ghost norm or instantiation (``2T^2 < d_in d_out``), clipped sum as
  one GEMM (``linear.py``).
* ``nn.Embedding``: ghost norm over equal token ids, ``index_add`` clipped sum; ``[1, T]`` broadcast position
  ids are expanded to the batch (``embedding.py``).
* ``nn.LayerNorm`` (``layer_norm.py``).
* T5-style relative attention bias tables (``relative_attention_bias`` of a module with ``compute_bias``: T5, mT5,
  UMT5, LongT5, ...): the owner's ``[1, H, q, k]`` bias is expanded to the batch and each example's gradient
  scattered into the buckets it read (``relative_bias.py``).
* Any other module that owns trainable parameters: ``torch.func`` ``vmap(grad(functional_call))`` on the
  recorded call (``functorch_fallback.py``). This covers RMSNorm (Llama, SmolLM, Mistral, ...) as fast as a
  closed form would: a dedicated rule was measured at 1.006x the fallback's step time and removed
  (``benchmarks/llama.py``).
* Tied / reused parameters (GPT-2 ``lm_head`` = ``wte``, a module called twice): the norm of the *sum* over
  uses, cross terms by ghost identities for Linear/Conv1D/Embedding, instantiated otherwise.

Your own layer: :func:`register_clipping_rule` (a :class:`Rule` for its type, checked against
:func:`hf_ewtune.testing.check_per_example_gradients`).

Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not): the recomputed forward records nothing
twice and raw gradients never reach ``p.grad`` (``checkpointing.py``).

Rejected (one :class:`~hf_ewtune.errors.UnsupportedModuleError` lists every offending module): BatchNorm, recurrent layers, parameters in modules without a forward.
``Embedding(scale_grad_by_freq=True)``, a trainable ``relative_attention_bias`` without ``compute_bias``, and (at every
backward) parameters used outside their module's forward (by a graph walk) and modules of the ``torch.func`` fallback
called without any batched tensor input (their output is shared by the batch).

Example:
    >>> import torch
    >>> from hf_ewtune.clipping import ClippingEngine
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    >>> engine = ClippingEngine(model, max_grad_norm=0.5)
    >>> norms = engine.backward(model(torch.randn(4, 3)).squeeze(1))
    >>> bool(model[0].weight.grad.norm() <= 4 * 0.5 + 1e-6)
    True
"""

from __future__ import annotations

from ._base import Record, Rule
from .engine import CLIPPING_STYLES, ClippingEngine, attached_engine
from .validation import register_clipping_rule, unregister_clipping_rule

__all__ = [
    "CLIPPING_STYLES",
    "ClippingEngine",
    "Record",
    "Rule",
    "attached_engine",
    "register_clipping_rule",
    "unregister_clipping_rule",
]
