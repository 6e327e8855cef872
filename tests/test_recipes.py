"""Unit tests of the recipe building blocks (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_ewtune.recipes.metrics import accuracy_metrics
from hf_ewtune.recipes.models import LoraSettings, apply_lora, lora_targets
from hf_ewtune.recipes.plotting import plot_privacy_curve, privacy_curve_points
from hf_ewtune.recipes.text_classification import TextClassificationConfig, tokenize_dataset
from hf_ewtune.recipes.training import RunResult, training_arguments
from hf_ewtune.testing import tiny_bert, tiny_gpt2, tiny_tokenizer


def test_accuracy_metrics_counts_argmax_matches():
    logits = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy_metrics((logits, np.array([1, 0, 0, 0]))) == {"accuracy": 0.75}
    assert accuracy_metrics(((logits,), np.array([1, 0, 1, 0]))) == {"accuracy": 1.0}


def test_lora_targets_per_architecture():
    assert lora_targets(tiny_bert()) == (["query", "value"], ["classifier"])
    assert lora_targets(tiny_gpt2(num_labels=2)) == (["c_attn"], ["score"])
    assert lora_targets(tiny_gpt2()) == (["c_attn"], [])
    import torch

    with pytest.raises(ValueError, match="target_modules"):
        lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_apply_lora_trains_adapters_and_head_only():
    model = apply_lora(tiny_bert(), settings=LoraSettings(r=4, alpha=8), task_type="SEQ_CLS")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or ("classifier" in n) for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)


def test_training_arguments_split_logical_batch():
    args = training_arguments(output_dir="/tmp/x", batch_size=256, micro_batch_size=32, epochs=1, learning_rate=1e-3, seed=0)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 256
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        training_arguments(output_dir="/tmp/x", batch_size=100, micro_batch_size=32, epochs=1, learning_rate=1e-3, seed=0)


def test_tokenize_dataset_pairs_and_missing_column():
    from datasets import Dataset, DatasetDict

    ds = DatasetDict({s: Dataset.from_dict({"q": ["a good film", "dull"], "s": ["warm", "a mess"], "label": [1, 0]})
                      for s in ("train", "test")})
    tok = tiny_tokenizer()
    cfg = TextClassificationConfig(text_column="q", text_pair_column="s", max_length=16)
    enc = tokenize_dataset(ds, tokenizer=tok, config=cfg)
    assert set(enc["train"].column_names) >= {"input_ids", "attention_mask", "labels"}
    assert enc["train"]["labels"] == [1, 0]
    sep = tok.sep_token_id
    assert enc["train"][0]["input_ids"].count(sep) == 2  # [CLS] a [SEP] b [SEP]
    with pytest.raises(ValueError, match="text_column"):
        tokenize_dataset(ds, tokenizer=tok, config=TextClassificationConfig(text_column="text"))


def test_privacy_curve_points_and_png(tmp_path):
    logs = [{"loss": 1.0, "step": 1}, {"epsilon": 0.5, "epsilon_edgeworth": 0.4, "step": 1},
            {"epsilon": 1.0, "epsilon_edgeworth": 0.9, "step": 2}, {"epsilon": 1.1, "step": 2}]
    steps, eps, ew = privacy_curve_points(logs)
    assert steps == [1, 2] and eps == [0.5, 1.1] and ew == [0.4, None]
    path = plot_privacy_curve(log_history=logs, path=tmp_path / "c.png", target_epsilon=3.0, certified_by="PLD",
                              delta=1e-5, final=(5, 2.0, 1.8))
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_privacy_curve(log_history=[{"loss": 1.0}], path=tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_run_result_summary_labels_estimate(tmp_path):
    r = RunResult(output_dir=str(tmp_path), metrics={"accuracy": 0.8}, wall_seconds=10, train_seconds=8, steps=5,
                  private=True, epsilon=2.9, certified_by="PLD", edgeworth_epsilon=2.7, delta=1e-5)
    text = "\n".join(r.summary_lines())
    assert "certified ε = 2.900" in text and "certified by PLD" in text
    assert "estimate (not a guarantee)" in text
    assert r.write_json().exists()
    base = RunResult(output_dir=str(tmp_path), metrics={"accuracy": 0.8}, wall_seconds=1, train_seconds=1, steps=1, private=False)
    assert "non-private" in "\n".join(base.summary_lines())
    assert math.isfinite(r.epsilon)


def test_lora_last_layers_adapts_only_the_top_layers():
    from hf_ewtune.recipes.models import num_layers

    model = apply_lora(tiny_bert(num_layers=3), settings=LoraSettings(r=2, alpha=4, last_layers=1), task_type="SEQ_CLS")
    adapted = {n.split(".layer.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"2"}
    every = apply_lora(tiny_bert(num_layers=3), settings=LoraSettings(r=2, alpha=4), task_type="SEQ_CLS")
    assert {n.split(".layer.")[1].split(".")[0] for n, _ in every.named_parameters() if "lora_A" in n} == {"0", "1", "2"}
    assert num_layers(tiny_gpt2()) == 2
    import torch

    with pytest.raises(ValueError, match="layers"):
        num_layers(torch.nn.Linear(2, 2))


def test_lora_last_layers_rejects_non_positive_counts(capsys):
    from hf_ewtune.cli import main

    with pytest.raises(ValueError, match="last_layers"):
        apply_lora(tiny_bert(), settings=LoraSettings(last_layers=-1), task_type="SEQ_CLS")
    assert main(["train", "--smoke", "--lora-last-layers", "-1"]) == 2  # rejected while parsing, before any training
    assert "argument --lora-last-layers: must be 0 or a positive integer" in capsys.readouterr().err
