#!/usr/bin/env python
"""Which sentence vector should the DP classifier read? A DP linear probe on frozen features.

The main job's classifier reads the mean-pooled, L2-normalised token states of all-MiniLM-L6-v2 (the
pooling its sentence-transformers checkpoint was trained with), not ``BertPooler``'s ``[CLS]`` output that
``AutoModelForSequenceClassification`` uses. This script is the evidence: it encodes the offline Rotten
Tomatoes data once with the frozen encoder, then trains only a linear head on each candidate vector,
non-privately and with DP-SGD at the main job's privacy settings (Poisson rate B/N, per-example clipping
at C = 1, Gaussian noise calibrated so the certified epsilon of the run is at most ``--target-epsilon``),
and prints test accuracy per vector (mean and spread over ``--repeats`` noise draws).

The linear head's per-example gradient is ``(softmax - onehot) x^T`` in closed form, so one step costs a
matrix product: the whole sweep takes about two minutes on 2 CPU cores, most of it encoding.

Examples:
    python examples/head_probe.py                  # all-MiniLM-L6-v2, epsilon 3, B = 256, 1 epoch
    python examples/head_probe.py --smoke          # tiny offline BERT and data, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

VECTORS = ("pooler", "cls", "mean", "mean_normalized")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size B (Poisson rate B/N)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=5e-2, help="AdamW learning rate of the head")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="DP runs per vector (fresh noise and sampling)")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def encode(args: argparse.Namespace) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({vector: {split: features}}, {split: labels})`` from the frozen encoder."""
    if args.smoke:
        from datasets import Dataset, DatasetDict

        from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS, tiny_bert, tiny_tokenizer

        full = Dataset.from_dict({"text": list(SAMPLE_TEXTS) * 8, "label": list(SAMPLE_LABELS) * 8}).shuffle(seed=0)
        data = DatasetDict({"train": full.select(range(48)), "test": full.select(range(48, 64))})
        tokenizer = tiny_tokenizer(list(data["train"]["text"]))
        model = tiny_bert(vocab_size=len(tokenizer)).bert
    else:
        from transformers import AutoModel, AutoTokenizer

        from hf_ewtune.data import load_text_classification, resolve_model

        data = load_text_classification("rotten_tomatoes_offline", seed=0)
        path, kwargs = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, **kwargs)
    model.eval()
    feats: dict[str, dict[str, torch.Tensor]] = {v: {} for v in VECTORS}
    labels = {}
    for split in ("train", "test"):
        texts, parts = data[split]["text"], {v: [] for v in VECTORS}
        for i in range(0, len(texts), 128):
            enc = tokenizer(texts[i:i + 128], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model(**enc)
            hidden, mask = out.last_hidden_state, enc["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1)
            parts["pooler"].append(out.pooler_output)
            parts["cls"].append(hidden[:, 0])
            parts["mean"].append(mean)
            parts["mean_normalized"].append(torch.nn.functional.normalize(mean, dim=-1))
        for v in VECTORS:
            feats[v][split] = torch.cat(parts[v])
        labels[split] = torch.tensor(data[split]["label"])
    return feats, labels


def train_head(x: torch.Tensor, y: torch.Tensor, *, args: argparse.Namespace, sigma: float | None,
               steps: int, generator: torch.Generator) -> torch.nn.Linear:
    """DP-SGD (``sigma`` set) or plain minibatch training of a zero-initialised linear head with AdamW."""
    n, num_labels = len(y), int(y.max()) + 1
    head = torch.nn.Linear(x.shape[1], num_labels)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.0)
    q, c = args.batch_size / n, args.max_grad_norm
    for _ in range(steps):
        if sigma is None:
            idx = torch.randperm(n, generator=generator)[: args.batch_size]
        else:
            idx = (torch.rand(n, generator=generator) < q).nonzero().squeeze(1)  # Poisson sampling
        xb, yb = x[idx], y[idx]
        with torch.no_grad():
            g = torch.softmax(head(xb), -1)
            g[torch.arange(len(yb)), yb] -= 1.0  # d loss_i / d logits_i
            gw, gb = g[:, :, None] * xb[:, None, :], g  # per-example gradients (closed form)
            if sigma is not None:
                norms = (gw.flatten(1).square().sum(1) + gb.square().sum(1)).sqrt()
                factor = (c / (norms + 1e-6)).clamp(max=1.0)
                gw, gb = gw * factor[:, None, None], gb * factor[:, None]
            sw, sb = gw.sum(0), gb.sum(0)
            if sigma is not None:
                sw += sigma * c * torch.randn(sw.shape, generator=generator)
                sb += sigma * c * torch.randn(sb.shape, generator=generator)
            denom = args.batch_size if sigma is not None else max(len(yb), 1)
        head.weight.grad, head.bias.grad = sw / denom, sb / denom
        opt.step()
    return head


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.batch_size, args.repeats = 16, 1
    from hf_ewtune.accounting import calibrate_noise_multiplier

    t0 = time.perf_counter()
    feats, labels = encode(args)
    n = len(labels["train"])
    steps = max(1, round(args.epochs * n / args.batch_size))
    delta = 10.0 ** __import__("math").floor(__import__("math").log10(min(1e-5, 1.0 / (10 * n))))
    sigma = calibrate_noise_multiplier(target_epsilon=args.target_epsilon, delta=delta,
                                       sample_rate=args.batch_size / n, steps=steps)
    print(f"encoded {n} train / {len(labels['test'])} test sentences in {time.perf_counter() - t0:.0f} s; "
          f"DP: B = {args.batch_size}, {steps} steps, sigma = {sigma:.4f} (certified epsilon <= "
          f"{args.target_epsilon:g}, delta = {delta:.0e}), head lr {args.learning_rate:g}")
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for v in VECTORS:
        xtr, xte = feats[v]["train"], feats[v]["test"]

        def acc(head: torch.nn.Linear) -> float:
            with torch.no_grad():
                return float((head(xte).argmax(-1) == labels["test"]).float().mean())

        plain = acc(train_head(xtr, labels["train"], args=args, sigma=None, steps=5 * steps, generator=gen))
        dp = [acc(train_head(xtr, labels["train"], args=args, sigma=sigma, steps=steps, generator=gen))
              for _ in range(args.repeats)]
        rows[v] = {"non_private": plain, "dp_mean": statistics.mean(dp), "dp_min": min(dp), "dp_max": max(dp)}
    majority = float(max((labels["test"] == k).float().mean() for k in labels["test"].unique()))
    print(f"\n| sentence vector | linear head, non-private (5 epochs) | linear head, DP ε = {args.target_epsilon:g} "
          f"(mean [min, max] of {args.repeats}) |\n|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['non_private']:.4f} | {r['dp_mean']:.4f} [{r['dp_min']:.4f}, {r['dp_max']:.4f}] |")
    print(f"\nmajority class: {majority:.4f}; total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"majority": majority, "sigma": sigma, "steps": steps, **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
