"""Split-and-Privatize on Rotten Tomatoes: accuracy against empirical privacy over a noise grid.

The data owner runs the frozen bottom (``split_layer`` k blocks of all-MiniLM-L6-v2), adds d_chi noise once per
example and uploads the privatized representations; the model owner trains LoRA (r=8 on query/value, plus the
classifier and pooler) on the top with ``transformers.Trainer``. For every setting we report test accuracy and the
empirical privacy ``1 - token recovery`` of the strongest inversion attack we ran against what the model owner
received:

* k = 0: nearest-neighbour (L2, maximum-likelihood) inversion against the embedding table, and a learned MLP
  inversion trained on public text (a disjoint slice of the corpus) pushed through the bottom and the mechanism;
* k = 2: the learned MLP inversion (nearest neighbour against word embeddings is meaningless there).

The noise is set by the relative level ``alpha = E||z|| / E||h||`` and converted to the per-token rate
``eta = d / (alpha * E||h||)`` (``E||h||`` measured on the public slice).

Usage::

    HF_HUB_OFFLINE=1 python examples/sap_sentiment.py --smoke          # tiny random BERT, 1-2 minutes
    HF_HUB_OFFLINE=1 python examples/sap_sentiment.py                  # MiniLM, 2000 train / 500 test

Outputs (``--out-dir``, default ``outputs/sap_sentiment``): ``results.json``, ``results.md`` (table) and
``sap_privacy_utility.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hf_ewtune.sap import (  # noqa: E402
    DChiPrivatizer,
    LearnedInversion,
    LocalTransport,
    SAPCustomer,
    SAPVendor,
    eta_for_relative_noise,
    median_nn_distance,
    nn_inversion,
    split_model,
)

logger = logging.getLogger("sap_sentiment")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random BERT and a few hundred examples (seconds)")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 2], help="split layers k")
    p.add_argument("--alphas", type=float, nargs="+", default=None,
                   help="relative noise levels E||z||/E||h|| (default 0.5 1 2 4)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-public", type=int, default=1000, help="attacker's public examples (disjoint from train/test)")
    p.add_argument("--n-attack", type=int, default=500, help="victim training examples the attacks are scored on")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--attack-epochs", type=int, default=3)
    p.add_argument("--attack-width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="outputs/sap_sentiment")
    p.add_argument("--skip-baseline", action="store_true",
                   help="run only the noisy grid (e.g. one process per split layer; combine with --merge)")
    p.add_argument("--baseline-only", action="store_true", help="run only the non-private baseline")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only merge results.json files of earlier runs into one table and plot in --out-dir")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_test, args.n_public, args.n_attack = 200, 100, 200, 100
        args.epochs, args.lr, args.max_length, args.attack_epochs, args.threads = 2.0, 5e-3, 32, 3, 1
        args.alphas = args.alphas or [0.5, 4.0]
    args.alphas = args.alphas or [0.5, 1.0, 2.0, 4.0]
    return args


def load_everything(args):
    """Tokenizer, base model and tokenized train / test / public splits."""
    from hf_ewtune.data import load_rotten_tomatoes

    data = load_rotten_tomatoes(seed=args.seed)
    train_all = data["train"].shuffle(seed=args.seed)
    n_tr = min(args.n_train, len(train_all) - args.n_public)
    train = train_all.select(range(n_tr))
    public = train_all.select(range(len(train_all) - args.n_public, len(train_all)))
    test = data["test"].select(range(min(args.n_test, len(data["test"]))))
    if args.smoke:
        from hf_ewtune.testing import tiny_bert, tiny_tokenizer

        tok = tiny_tokenizer(list(train["text"]) + list(public["text"]), vocab_size=1000)
        model = tiny_bert(vocab_size=len(tok), hidden_size=64, num_layers=3, seed=args.seed)
        model.config.max_position_embeddings = 64
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from hf_ewtune.data import minilm_path

        tok = AutoTokenizer.from_pretrained(minilm_path())
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model.eval()

    def enc(ds):
        out = tok(list(ds["text"]), truncation=True, max_length=args.max_length)
        return {"input_ids": out["input_ids"], "labels": list(ds["label"])}

    return tok, model, enc(train), enc(test), enc(public)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS",
                      modules_to_save=["classifier", "pooler"])


def bottom_outputs(bottom, data, *, batch_size=64, pad_id=0):
    """Real-token bottom outputs ``[N_tokens, d]`` and their ids, example by example (for calibration/attacks)."""
    from hf_ewtune.sap.roles import iter_batches

    hs, ids, lens = [], [], []
    with torch.no_grad():
        for _, b in iter_batches(data, batch_size=batch_size, pad_token_id=pad_id):
            h = bottom(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            m = b["attention_mask"].bool()
            hs.append(h[m])
            ids.append(b["input_ids"][m])
            lens += m.sum(1).tolist()
    return torch.cat(hs), torch.cat(ids), lens


def learned_attack(bottom, eta, public, victim_hidden, victim_ids, *, vocab_size, special, args):
    """Train an MLP inversion on public text through bottom + mechanism; score it on the victim's upload."""
    h_pub, ids_pub, _ = bottom_outputs(bottom, public)
    priv = DChiPrivatizer(eta=eta, cache_per_example=False, seed=args.seed + 1000)  # the attacker's own draws
    batches = []
    for hs, ys in zip(h_pub.split(1024), ids_pub.split(1024)):
        noisy = priv(hs.unsqueeze(0))[0]
        batches.append((noisy.unsqueeze(0), ys.unsqueeze(0), torch.ones(1, len(ys), dtype=torch.long)))
    cand = torch.tensor(sorted(set(ids_pub.tolist()) - set(special)))
    att = LearnedInversion(hidden_size=h_pub.shape[1], vocab_size=vocab_size, width=args.attack_width,
                           candidate_ids=cand)
    att.fit(batches, epochs=args.attack_epochs, lr=2e-3, exclude_ids=special, seed=args.seed)
    return att.evaluate(victim_hidden.unsqueeze(0), token_ids=victim_ids.unsqueeze(0), exclude_ids=special)


def run_setting(model, tok, k, alpha, mean_norm, train, test, public, args):
    bottom, top = split_model(model, split_layer=k)
    d = bottom.hidden_size
    eta = math.inf if alpha == 0 else eta_for_relative_noise(alpha=alpha, mean_norm=mean_norm, d=d)
    vendor = SAPVendor(top=top, peft_config=lora_config(), training_args={"log_level": "error"})
    priv = DChiPrivatizer(eta=eta, seed=args.seed)
    customer = SAPCustomer(bottom=bottom, privatizer=priv, transport=LocalTransport(vendor.handle),
                           pad_token_id=tok.pad_token_id or 0)
    t0 = time.time()
    metrics = customer.fit(train, batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.lr,
                           seed=args.seed)
    train_s = time.time() - t0
    logits = customer.predict(test, batch_size=64)
    acc = float((logits.argmax(-1) == torch.tensor(test["labels"])).float().mean())

    # attacks on what the model owner actually received for the first n_attack training examples
    n_att = min(args.n_attack, len(vendor.rows))
    victim_h = torch.cat([r["inputs_embeds"][r["attention_mask"].bool()] for r in vendor.rows[:n_att]])
    victim_ids = torch.cat([torch.tensor(x) for x in train["input_ids"][:n_att]])
    special = list(tok.all_special_ids)
    t1 = time.time()
    res = {"k": k, "alpha": alpha, "eta": eta, "epochs": args.epochs, "expected_noise_norm": 0.0 if math.isinf(eta) else d / eta,
           "accuracy": acc, "train_loss": metrics["train_loss"], "train_seconds": round(train_s, 1)}
    attacks = {}
    if k == 0:
        attacks["nn_l2"] = nn_inversion(victim_h.unsqueeze(0), bottom.embedding_matrix,
                                        token_ids=victim_ids.unsqueeze(0), exclude_ids=special)
    attacks["learned_mlp"] = learned_attack(bottom, eta, public, victim_h, victim_ids,
                                            vocab_size=bottom.embedding_matrix.shape[0], special=special, args=args)
    res["attack_seconds"] = round(time.time() - t1, 1)
    res["attacks"] = {name: {"top1": a["top1"], "top5": a["top5"]} for name, a in attacks.items()}
    res["empirical_privacy"] = 1.0 - max(a["top1"] for a in attacks.values())
    res["guarantee"] = priv.guarantee().as_dict()
    logger.info("k=%d alpha=%g eta=%.4g acc=%.4f EP=%.3f (%s) train %.0fs attack %.0fs", k, alpha, eta, acc,
                res["empirical_privacy"], {n: round(a["top1"], 3) for n, a in attacks.items()}, train_s,
                res["attack_seconds"])
    return res


def write_outputs(results, baseline, args, out: Path, total_s: float):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "baseline": baseline, "results": results,
                                                  "total_seconds": round(total_s, 1)}, indent=2, default=str))
    base = baseline["accuracy"]
    lines = ["| k | alpha = E‖z‖/E‖h‖ | eta (per token) | epochs | accuracy | Δ vs baseline (pts) | NN top-1 |"
             " learned top-1 | empirical privacy |", "|---|---|---|---|---|---|---|---|---|",
             f"| – (no noise) | 0 | ∞ | {baseline.get('epochs', args.epochs):g} | {base:.3f} | 0.0 | "
             f"{baseline['attacks']['nn_l2']['top1']:.3f} | {baseline['attacks']['learned_mlp']['top1']:.3f} | "
             f"{baseline['empirical_privacy']:.3f} |"]
    for r in results:
        nn = r["attacks"].get("nn_l2", {}).get("top1")
        lines.append(f"| {r['k']} | {r['alpha']:g} | {r['eta']:.4g} | {r.get('epochs', args.epochs):g} | "
                     f"{r['accuracy']:.3f} | "
                     f"{100 * (r['accuracy'] - base):+.1f} | {'–' if nn is None else f'{nn:.3f}'} | "
                     f"{r['attacks']['learned_mlp']['top1']:.3f} | {r['empirical_privacy']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, marker in zip(sorted({r["k"] for r in results}), "os^D"):
        rs = [r for r in results if r["k"] == k]
        ax.plot([r["empirical_privacy"] for r in rs], [r["accuracy"] for r in rs], marker=marker, label=f"SAP k={k}")
        for r in rs:
            ep = r.get("epochs", args.epochs)
            ax.annotate(f"α={r['alpha']:g}" + ("" if ep == args.epochs else f", {ep:g} ep"), (r["empirical_privacy"], r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(base, color="gray", ls="--", label=f"non-private ({base:.3f})")
    ax.axhspan(base - 0.02, base, color="gray", alpha=0.15, label="within 2 pts")
    ax.set_xlabel("empirical privacy (1 - token recovery, strongest attack)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Split-and-Privatize, Rotten Tomatoes" + (" (smoke)" if args.smoke else ", MiniLM-L6"))
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sap_privacy_utility.png", dpi=120)
    plt.close(fig)


def merge(args) -> dict:
    """Combine ``results.json`` files (one of them with the baseline) into one table and plot."""
    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    for run in runs:  # older files lack the per-setting epoch count
        for x in run["results"] + ([run["baseline"]] if run.get("baseline") else []):
            x.setdefault("epochs", run["args"]["epochs"])
    baseline = next(r["baseline"] for r in runs if r.get("baseline"))
    results = sorted((x for r in runs for x in r["results"]), key=lambda x: (x["k"], x["alpha"]))
    total = sum(r.get("total_seconds", 0.0) for r in runs)
    run_args = argparse.Namespace(**{**runs[0]["args"], "merged_from": args.merge})
    write_outputs(results, baseline, run_args, Path(args.out_dir), total)
    return {"baseline": baseline, "results": results, "total_seconds": total}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:
        return merge(args)
    for name in ("transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    tok, model, train, test, public = load_everything(args)
    logger.info("train %d, test %d, public %d examples", len(train["labels"]), len(test["labels"]),
                len(public["labels"]))
    bottom0, _ = split_model(model, split_layer=0)
    nnd = median_nn_distance(bottom0.embedding_matrix)
    baseline = None
    if not args.skip_baseline:
        baseline = run_setting(model, tok, 0, 0, 1.0, train, test, public, args)  # k=0, no noise == full model
        baseline["median_nn_distance"] = nnd
    results = []
    for k in [] if args.baseline_only else args.splits:
        bottom, _ = split_model(model, split_layer=k)
        h_pub, _, _ = bottom_outputs(bottom, public)
        mean_norm = float(h_pub.norm(dim=-1).mean())
        logger.info("k=%d: mean ||h|| on public data = %.3f (d=%d)", k, mean_norm, h_pub.shape[1])
        for alpha in args.alphas:
            r = run_setting(model, tok, k, alpha, mean_norm, train, test, public, args)
            r["mean_norm"] = mean_norm
            if k == 0:
                r["rho"] = r["expected_noise_norm"] / nnd
            results.append(r)
    total = time.time() - t_start
    if baseline is None:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "baseline": None, "results": results,
                                                      "total_seconds": round(total, 1)}, indent=2, default=str))
    else:
        write_outputs(results, baseline, args, Path(args.out_dir), total)
    logger.info("total wall time %.0fs on %d threads", total, args.threads)
    return {"baseline": baseline, "results": results, "total_seconds": total}


if __name__ == "__main__":
    main()
