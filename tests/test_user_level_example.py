"""examples/user_level.py --smoke: user-level and example-level runs at the same certified epsilon."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_user_level_example_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("example_user_level", ROOT / "examples" / "user_level.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--out-dir", str(tmp_path)])
    example, user = results["runs"]
    assert (example["privacy_unit"], user["privacy_unit"]) == ("example", "user")
    assert all(0 < r["epsilon"] <= 3.0 + 1e-6 and 0.0 <= r["accuracy"] <= 1.0 for r in results["runs"])
    assert user["sample_rate"] == user["per_device_train_batch_size"] / results["authors"]
    assert example["sample_rate"] == example["per_device_train_batch_size"] / results["train_rows"]
    assert json.loads((tmp_path / "results.json").read_text())["authors"] == results["authors"]
    state = json.loads((tmp_path / "user" / "_privacy_state.json").read_text())
    assert state["privacy_unit"] == "user" and state["num_users"] == results["authors"]
    assert "privacy_unit: user" in (tmp_path / "user" / "README.md").read_text()
