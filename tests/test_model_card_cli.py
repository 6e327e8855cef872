"""``hf-ewtune card`` / ``hf-ewtune report`` on a saved output folder, and the missing-state error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from hf_ewtune.accounting import EdgeworthAccountant, PLDAccountant
from hf_ewtune.cli import main
from hf_ewtune.model_card import BEGIN_MARKER, PRIVACY_TAGS, read_privacy_metadata
from hf_ewtune.privacy_state import save_privacy_state


@pytest.fixture
def saved_run(tmp_path):
    """An output folder in DPTrainer's layout: weights would sit here; a Trainer card and _privacy_state.json."""
    acc = EdgeworthAccountant()
    acc.step(noise_multiplier=1.2, sample_rate=0.02, num_steps=50)
    save_privacy_state(str(tmp_path), {
        "accountant": "edgeworth", "accountant_state": acc.state_dict(), "steps": 50, "delta": 1e-5,
        "target_epsilon": None, "noise_multiplier": 1.2, "sample_rate": 0.02, "max_grad_norm": 1.0,
        "clipping": "flat", "poisson_sampling": True, "expected_batch_size": 7, "world_size": 1,
        "calibration": None, "stopped_early": False, "epochs": 1.0, "library_version": "0.1.0",
        "randomness": "torch generators seeded from OS entropy via secrets (unpredictable, not a CSPRNG)",
    })
    (tmp_path / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n\n# run\n\n## Training procedure\n",
        encoding="utf-8")
    return tmp_path


def test_card_command_writes_and_rerenders(saved_run, capsys):
    assert main(["card", str(saved_run)]) == 0
    first = (saved_run / "README.md").read_text(encoding="utf-8")
    meta = read_privacy_metadata(saved_run)
    acc = PLDAccountant()
    acc.step(noise_multiplier=1.2, sample_rate=0.02, num_steps=50)
    assert meta["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert meta["steps"] == 50 and "expected_batch_size" not in meta
    assert "not a CSPRNG" in meta["noise_rng"]
    assert "generated_from_trainer" in first and all(t in first for t in PRIVACY_TAGS)
    assert "certified epsilon" in capsys.readouterr().out
    assert main(["card", str(saved_run)]) == 0  # idempotent
    assert (saved_run / "README.md").read_text(encoding="utf-8") == first
    assert first.count(BEGIN_MARKER) == 1
    assert main(["card", str(saved_run), "--include-dataset-size"]) == 0
    assert read_privacy_metadata(saved_run)["expected_batch_size"] == 7


def test_report_command(saved_run, capsys):
    assert main(["report", str(saved_run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Certified guarantee:")
    assert "certified by: dp-accounting" in out and "PLD" in out
    assert "Edgeworth estimate (not a guarantee)" in out
    assert main(["report", str(saved_run), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["edgeworth_estimate"]["label"] == "estimate (not a guarantee)" and meta["sampling"] == "Poisson"


@pytest.mark.parametrize("command", ["card", "report"])
def test_missing_privacy_state_exits_2(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "_privacy_state.json" in err and "Traceback" not in err
    assert not (tmp_path / "README.md").exists()


def test_console_script_report(saved_run):
    exe = shutil.which("hf-ewtune", path=os.path.dirname(sys.executable)) or shutil.which("hf-ewtune")
    cmd = [exe] if exe else [sys.executable, "-m", "hf_ewtune.cli"]
    ok = subprocess.run([*cmd, "report", str(saved_run)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Certified guarantee" in ok.stdout
    bad = subprocess.run([*cmd, "report", str(saved_run / "nope")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "_privacy_state.json" in bad.stderr


def test_card_command_on_committed_example(tmp_path):
    """model_cards/example holds the card and _privacy_state.json of a real LoRA DPTrainer run (see
    model_cards/make_example.py): it parses, and re-rendering it keeps one section and the same epsilon."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "model_cards" / "example"
    committed = read_privacy_metadata(example)
    assert committed["sampling"] == "Poisson" and committed["target_epsilon"] == 3.0
    assert committed["epsilon"] <= 3.0 and "expected_batch_size" not in committed
    work = tmp_path / "example"
    shutil.copytree(example, work)
    assert main(["card", str(work)]) == 0
    fresh = read_privacy_metadata(work)
    assert fresh["epsilon"] == pytest.approx(committed["epsilon"], rel=1e-6)
    text = (work / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN_MARKER) == 1 and "library_name: peft" in text
