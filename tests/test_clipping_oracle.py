"""Test helpers for the clipping engine: tiny models, per-example losses and the one-example-at-a-time oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_ewtune.testing import tiny_bert, tiny_gpt2


def bert_batch(b: int = 4, t: int = 9, *, vocab: int = 200, seed: int = 1, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        for i in range(b):
            n = t - (i % 3) * 2
            mask[i, n:] = 0
            ids[i, n:] = 0
    labels = torch.randint(0, 2, (b,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gpt2_batch(b: int = 3, t: int = 8, *, vocab: int = 200, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 3:] = 0
    ids[0, t - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cls_loss(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Per-sequence mean next-token loss over that sequence's own (unpadded) tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100)
    return tok.sum(1) / (target != -100).sum(1)


def lora_bert(dtype=torch.float64):
    from peft import LoraConfig, get_peft_model

    model = tiny_bert().to(dtype)
    cfg = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], modules_to_save=["classifier"], r=4,
                     lora_alpha=8, lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    # LoRA B starts at zero: perturb it so that lora_A gets non-zero gradients.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train()


def make(kind: str, dtype=torch.float64):
    """(model, batch, loss_fn) for "bert", "gpt2", "lora"."""
    if kind == "bert":
        return tiny_bert().to(dtype).train(), bert_batch(), cls_loss
    if kind == "gpt2":
        return tiny_gpt2().to(dtype).train(), gpt2_batch(), lm_loss
    if kind == "lora":
        return lora_bert(dtype), bert_batch(), cls_loss
    raise ValueError(kind)


def slice_batch(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def loop_grads(model, batch: dict, loss_fn) -> dict[str, torch.Tensor]:
    """Ground truth: one backward per example. Returns {name: Tensor[B, *shape]} for trainable params.

    The library's public oracle loop (``hf_ewtune.gradient_check``), shipped for users' own architectures.
    """
    from hf_ewtune.gradient_check import loop_per_example_gradients

    return loop_per_example_gradients(model, batch, loss_fn)


def group_names(names) -> list[str]:
    return [n.rsplit(".", 1)[0] if "." in n else "" for n in names]


def expected_clipped_sum(per_ex: dict[str, torch.Tensor], *, c: float, style: str) -> dict[str, torch.Tensor]:
    names = list(per_ex)
    b = per_ex[names[0]].shape[0]
    sq = {n: per_ex[n].reshape(b, -1).pow(2).sum(1) for n in names}
    total = sum(sq.values()).sqrt()
    if style == "flat":
        fac = {n: (c / (total + 1e-6)).clamp(max=1.0) for n in names}
    elif style == "automatic":
        fac = {n: c / (total + 0.01) for n in names}
    else:
        groups = group_names(names)
        n_groups = len(set(groups))
        gsq = {}
        for n, grp in zip(names, groups):
            gsq[grp] = gsq.get(grp, 0) + sq[n]
        c_l = c / math.sqrt(n_groups)
        fac = {n: (c_l / (gsq[grp].sqrt() + 1e-6)).clamp(max=1.0) for n, grp in zip(names, groups)}
    return {n: torch.tensordot(fac[n].to(per_ex[n].dtype), per_ex[n], dims=1) for n in names}
