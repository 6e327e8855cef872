"""examples/sap_sentiment.py runs end to end in --smoke mode (tiny random BERT, offline Rotten Tomatoes)."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sap_sentiment.py"


@pytest.mark.slow
def test_sap_sentiment_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("sap_sentiment", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    n_threads = torch.get_num_threads()
    try:
        out = mod.main(["--smoke", "--splits", "0", "--alphas", "4", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(n_threads)  # main() sets the thread count for the whole process
    assert (tmp_path / "results.md").exists() and (tmp_path / "sap_privacy_utility.png").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["baseline"]["empirical_privacy"] < 0.05  # raw embeddings are invertible
    (r,) = out["results"]
    assert r["k"] == 0 and r["empirical_privacy"] > 0.5  # alpha = 4 hides most tokens from NN and MLP
    assert 0.0 <= r["accuracy"] <= 1.0 and r["guarantee"]["draws_per_example"] == 1
