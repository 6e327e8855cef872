"""End-to-end smoke runs of the main job and the examples (tiny offline models, in-process)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_private_output(out: Path, *, target: float) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["private"] is True
    assert 0 < results["epsilon"] <= target + 1e-6
    assert "PLD" in results["certified_by"] or "RDP" in results["certified_by"]
    assert results["edgeworth_epsilon"] is not None and math.isfinite(results["edgeworth_epsilon"])
    card = (out / "README.md").read_text()
    assert "privacy:" in card and "certified" in card
    assert (out / "privacy_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").exists()
    return results


def test_train_command_smoke_end_to_end(tmp_path, capsys):
    from hf_ewtune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--smoke", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy:" in printed
    assert "certified ε =" in printed and "certified by" in printed
    assert "estimate (not a guarantee)" in printed
    assert f"privacy curve: {out / 'privacy_curve.png'}" in printed and "not written" not in printed
    results = _check_private_output(out, target=3.0)
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    assert results["steps"] > 0


def test_cli_registers_train():
    import argparse

    from hf_ewtune import cli

    assert "hf_ewtune.commands.train" in cli.COMMAND_MODULES
    from hf_ewtune.commands import train

    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--output-dir", "x", "--target-epsilon", "1", "--non-private", "--smoke"])
    cfg = train.config_from_args(args)
    assert cfg.privacy.private is False and cfg.privacy.target_epsilon == 1.0 and cfg.smoke
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--target-epsilon", "-1"])


def test_glue_smoke_single_and_pair_tasks(tmp_path, capsys):
    glue = _load_example("glue")
    assert glue.main(["--smoke", "--tasks", "sst2,mnli", "--output-dir", str(tmp_path), "--no-progress",
                      "--accountant", "pld"]) == 0
    printed = capsys.readouterr().out
    assert "| sst2 |" in printed and "| mnli |" in printed
    table = json.loads((tmp_path / "results.json").read_text())
    for task in ("sst2", "mnli"):
        assert 0 < table[task]["epsilon"] <= 8.0 + 1e-6
        assert 0.0 <= table[task]["accuracy"] <= 1.0
    mnli = glue.synthetic_glue("mnli")
    assert mnli["train"].features["label"].num_classes == 3
    assert {"premise", "hypothesis"} <= set(mnli["train"].column_names)


def test_causal_lm_smoke(tmp_path, capsys):
    lm = _load_example("causal_lm")
    out = tmp_path / "lm"
    assert lm.main(["--smoke", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "certified ε =" in printed
    results = _check_private_output(out, target=8.0)
    assert results["metrics"]["perplexity"] > 1.0


def test_causal_lm_rejects_missing_text_file(tmp_path):
    from hf_ewtune.recipes.causal_lm import read_records

    with pytest.raises(FileNotFoundError, match="text-file"):
        read_records(text_file=str(tmp_path / "nope.txt"))
    f = tmp_path / "one.txt"
    f.write_text("only one line\n\n")
    with pytest.raises(ValueError, match="at least 2"):
        read_records(text_file=str(f))


def test_head_probe_smoke_prints_table_and_json(capsys):
    probe = _load_example("head_probe")
    assert probe.main(["--smoke"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    assert result["sigma"] > 0 and result["steps"] >= 1
    for vector in probe.VECTORS:
        row = result[vector]
        assert 0.0 <= row["dp_min"] <= row["dp_mean"] <= row["dp_max"] <= 1.0
        assert any(ln.startswith(f"| {vector} |") for ln in lines)


def test_train_smoke_mean_pooling_writes_head_settings(tmp_path, capsys):
    from hf_ewtune.cli import main

    out = tmp_path / "pooled"
    assert main(["train", "--smoke", "--pooling", "mean", "--output-dir", str(out), "--no-progress"]) == 0
    assert "accuracy:" in capsys.readouterr().out
    _check_private_output(out, target=3.0)
    head = json.loads((out / "pooled_head.json").read_text())
    assert head["pooling"] == "mean" and head["normalize"] is True and head["num_labels"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "classifier" in adapter["modules_to_save"]
    card = (out / "README.md").read_text()
    assert "## How to load" in card and "load_pooled_classifier" in card and "mean-pooled, L2-normalised" in card


def test_train_checkpoints_and_resume_keep_the_spent_privacy(tmp_path, capsys):
    from hf_ewtune.cli import main

    out = tmp_path / "resumable"
    common = ["train", "--smoke", "--pooling", "mean", "--output-dir", str(out), "--no-progress", "--save-steps", "1"]
    assert main(common) == 0
    first = json.loads((out / "results.json").read_text())
    last = out / f"checkpoint-{first['steps']}"
    assert (last / "_privacy_state.json").is_file() and (out / "checkpoint-1" / "_privacy_state.json").is_file()
    # A run interrupted after step 2 (its last checkpoint removed) resumes to the same plan and epsilon.
    import shutil

    shutil.rmtree(last)
    capsys.readouterr()
    assert main(common + ["--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["steps"] == first["steps"] and again["epsilon"] == pytest.approx(first["epsilon"], rel=1e-9)
    assert last.is_dir()  # the resumed run wrote the final checkpoint again
    # Resuming a finished run would spend more than the budget: refused before training, with the reason.
    capsys.readouterr()
    assert main(common + ["--resume"]) == 2
    assert "is spent" in capsys.readouterr().err
    assert main(["train", "--smoke", "--output-dir", str(tmp_path / "empty"), "--no-progress", "--resume"]) == 2
    assert "checkpoint" in capsys.readouterr().err
