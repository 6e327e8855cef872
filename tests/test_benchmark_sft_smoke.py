"""Smoke test of benchmarks/sft.py (TRL SFT step vs DP SFT step): it runs and its last line is the JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sft_benchmark_quick_prints_ratios_for_lora_and_full():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("lora", "full"):
        assert result[mode]["time_ratio"] > 0 and result[mode]["memory_ratio"] > 0
        assert result[mode]["dp"]["trained_params"] == result[mode]["trl"]["trained_params"]
    assert result["lora"]["dp"]["trained_params"] < result["full"]["dp"]["trained_params"]
