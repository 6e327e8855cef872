"""Real-model runs of the main job and the causal-LM example on small subsets (slow: real MiniLM / SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_main_job_real_minilm_subset(tmp_path, capsys):
    from hf_ewtune.cli import main

    out = tmp_path / "minilm"
    status = main(["train", "--output-dir", str(out), "--max-train-samples", "256", "--max-eval-samples", "64",
                   "--batch-size", "64", "--micro-batch-size", "32", "--epochs", "1", "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in printed and "certified ε =" in printed
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["epsilon"] <= 3.0 + 1e-6
    assert results["steps"] == 4  # 1 epoch of 256 examples at an expected batch of 64
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"query", "value"} and config["r"] == 8
    assert config["layers_to_transform"] == [4, 5]  # the top 2 of MiniLM's 6 layers
    assert "classifier" in (config.get("modules_to_save") or [])
    assert (out / "privacy_curve.png").exists() and "privacy:" in (out / "README.md").read_text()
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    # The default head is the checkpoint's own pooling, and the saved run rebuilds to the same predictions.
    head = json.loads((out / "pooled_head.json").read_text())
    assert (head["pooling"], head["normalize"], head["base_model"]) == ("mean", True, "all-MiniLM-L6-v2")
    import torch
    from transformers import AutoTokenizer

    from hf_ewtune.data import load_text_classification
    from hf_ewtune.recipes.pooling import load_pooled_classifier

    model = load_pooled_classifier(out)
    assert model.classifier.weight.abs().sum() > 0  # the trained head, not the zero initialisation
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    test = load_text_classification("rotten_tomatoes_offline", seed=0)["test"].select(range(64))
    enc = tokenizer(list(test["text"]), truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**enc).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(list(test["label"]))).float().mean().item()
    assert accuracy == pytest.approx(results["metrics"]["accuracy"], abs=1e-6)


def test_causal_lm_real_smollm2_subset(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("example_causal_lm", ROOT / "examples" / "causal_lm.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    out = tmp_path / "smollm2"
    status = lm.main(["--output-dir", str(out), "--max-train-samples", "32", "--batch-size", "16", "--micro-batch-size", "8",
                      "--max-length", "24", "--max-eval-samples", "16", "--max-new-tokens", "3", "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "certified ε =" in printed
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["epsilon"] <= 8.0 + 1e-6
    assert 1.0 < results["metrics"]["perplexity"] < 1e4  # a real pretrained LM, not a random one
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert not (out / "model.safetensors").exists()  # adapter only for the GGUF-loaded base
