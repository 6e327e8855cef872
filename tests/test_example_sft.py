"""examples/sft.py --smoke: DP SFT of a tiny Llama on instruction-formatted sentiment, scored by generation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


def test_sft_example_smoke_writes_results_and_a_private_card(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("example_sft", ROOT / "examples" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    assert sft.main(["--smoke", "--output-dir", str(tmp_path), "--target-epsilon", "8"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["private"] is True and 0 < results["epsilon"] <= 8.0 + 1e-6
    assert 0.0 <= results["accuracy"] <= 1.0 and results["steps"] >= 1
    card = (tmp_path / "README.md").read_text()
    assert "privacy:" in card and "one training example" in card
    assert "generation accuracy" in capsys.readouterr().out
