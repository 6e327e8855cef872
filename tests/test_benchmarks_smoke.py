"""Smoke test of benchmarks/step.py: it runs end to end and its last line is the promised JSON object.

No timing is asserted (speed belongs to the benchmark itself, not to the test-suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("full", "lora", "memory_full", "opacus_hooks_over_ours")


@pytest.mark.slow
def test_step_benchmark_quick_gpt2_prints_json_last_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--quick", "--only", "gpt2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    assert list(result)[: len(REQUIRED)] == list(REQUIRED)
    # Only gpt2 ran: the MiniLM keys are present but empty, the gpt2 figures are filled in.
    assert result["full"] is None and result["lora"] is None
    gpt2 = result["summary"]["gpt2"]
    assert gpt2["plain"]["median_s"] > 0 and gpt2["plain"]["time_ratio"] == 1.0
    assert gpt2["plain"]["mem_added_mb"] is not None
    assert gpt2["opacus_hooks"]["time_ratio"] is not None, result["errors"]
    # The table is printed above the JSON line.
    assert any(ln.startswith("gpt2") and "(a) Trainer" in ln for ln in lines[:-1])


def test_llama_benchmark_tiny_run_prints_ratio_json():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llama.py"), "--layers", "1", "--vocab", "512", "--batch", "2",
         "--seq", "16", "--reps", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dp_over_plain"] > 0 and set(result["median_s"]) == {"plain", "dp"}
    assert "RMSNorm layers (torch.func fallback)" in proc.stdout


@pytest.mark.slow
def test_llm_benchmark_quick_prints_table_and_json():
    """``benchmarks/llm.py --quick``: tiny Llama, Trainer / DPTrainer / Opacus ghost, LoRA and full fine-tuning,
    checkpointing off and on, plus the FSDP2 2-process run; every figure present. Opacus 1.6 ghost clipping fails
    under gradient checkpointing (reported in the row, not raised); the Trainers run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = [f"tiny/{ft}/T32/ckpt-{c}" for ft in ("lora", "full") for c in ("off", "on")]
    assert sorted(result["configs"]) == sorted(keys)
    for key in keys:
        row = result["configs"][key]
        ran = ("plain", "dp") if key.endswith("ckpt-on") else ("plain", "dp", "opacus")
        for method in ran:
            assert row[method]["error"] is None, (key, method, row[method]["error"])
            assert row[method]["median_s"] > 0 and row[method]["added_mb"] is not None
        assert row["plain"]["time_ratio"] == 1.0 and row["dp"]["time_ratio"] > 0
        if key.endswith("ckpt-on"):  # Opacus ghost counts the recomputed forward as a second use of every weight
            assert "tying" in row["opacus"]["error"]
    fsdp = result["fsdp2"]
    assert fsdp["errors"] == [] and fsdp["fsdp2_over_one_process"] > 0
    assert fsdp["runs"]["fsdp2_two_processes"][0]["world"] == 2
    assert any(line.startswith("tiny/full/T32/ckpt-on") and "DPTrainer" in line for line in proc.stdout.splitlines())
