"""Tiny offline set-up for the DP TRL tests: a byte-level tokenizer with a chat template and a tiny Llama."""

from __future__ import annotations

import torch

from hf_ewtune.testing import tiny_tokenizer

# A ChatML-like template with {% generation %} marks, so that TRL's assistant_only_loss works offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|a|>{% generation %}{{ m['content'] }}<|endoftext|>{% endgeneration %}"
    "{% else %}<|u|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|a|>{% endif %}"
)


def chat_tokenizer():
    """Byte-level BPE tokenizer (no network) with a chat template; eos = pad = ``<|endoftext|>`` (id 0)."""
    tok = tiny_tokenizer(kind="bpe")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama (RMSNorm, rotary, grouped attention) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype)


def clipped_sum_oracle(model, losses_one_at_a_time, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """``sum_i min(1, C/||g_i||) g_i`` from plain autograd, one privacy unit at a time (hooks must be suspended)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for loss in losses_one_at_a_time:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for (n, _), g in zip(params.items(), grads):
            total[n] += factor * g
    return total


def args_kw(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=4,
              save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=48)
    kw.update(overrides)
    return kw
