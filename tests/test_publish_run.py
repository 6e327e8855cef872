"""``hf-ewtune train --push-to-hub``: the finished run reaches the (fake) Hub with its privacy card.

A subprocess (``HF_HUB_OFFLINE=0``, ``HF_ENDPOINT`` = the fake hub, proxies pointed at a closed port)
runs the smoke main job with a mean-pooled head and ``--push-to-hub``; nothing in hf_ewtune or
huggingface_hub is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fake_hub import FAKE_USER, FakeHub
from tests.test_push_to_hub import _isolated_env

pytestmark = pytest.mark.slow


def test_train_push_to_hub_uploads_model_card_and_keeps_private_files_local(tmp_path):
    repo_id = f"{FAKE_USER}/minilm-rt-smoke"
    out = tmp_path / "run"
    with FakeHub() as hub:
        proc = subprocess.run(
            [sys.executable, "-m", "hf_ewtune.cli", "train", "--smoke", "--pooling", "mean", "--no-progress",
             "--output-dir", str(out), "--push-to-hub", repo_id],
            env=_isolated_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "published:" in proc.stdout
        card = hub.file(repo_id, "README.md").decode("utf-8")
        uploaded = set(hub.repos[repo_id].files)
    assert "privacy:" in card and "certified upper bound" in card and "## How to load" in card
    assert {"adapter_model.safetensors", "adapter_config.json", "pooled_head.json", "privacy_curve.png",
            "tokenizer.json"} <= uploaded
    # the exact sampling rate (it reveals N), run settings and checkpoints stay on this machine
    assert not {"_privacy_state.json", "results.json", "training_args.bin"} & uploaded
    assert (out / "_privacy_state.json").is_file()
    assert json.loads((out / "results.json").read_text())["hub_commit"]


def test_publish_refuses_a_run_without_card(tmp_path):
    from hf_ewtune.recipes.hub import publish_run

    with pytest.raises(FileNotFoundError, match="model card"):
        publish_run(tmp_path, repo_id=f"{FAKE_USER}/nothing")


def test_failed_push_keeps_the_run_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from hf_ewtune.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: the upload fails
    out = tmp_path / "run"
    status = main(["train", "--smoke", "--no-progress", "--output-dir", str(out), "--push-to-hub", f"{FAKE_USER}/x"])
    assert status == 1
    assert "publishing to fake-user/x failed" in capsys.readouterr().err
    assert (out / "README.md").is_file() and json.loads((out / "results.json").read_text())["hub_commit"] is None
