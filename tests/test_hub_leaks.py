"""The privacy state and the non-private training logs never reach the Hub, whatever the upload path.

Against the fake Hub at the HTTP boundary (``tests/fake_hub.py``; nothing in hf_ewtune or huggingface_hub is
mocked), one subprocess trains a tiny ``DPTrainer`` per ``hub_strategy`` (pushing at every checkpoint save),
then saves the model into a subfolder (``output_dir/final``), writes ``trainer_state.json`` and
``train_results.json``/``all_results.json`` (``save_state``/``save_metrics``) and a TensorBoard event file,
and calls ``push_to_hub``; it also publishes a run folder with :func:`hf_ewtune.recipes.hub.publish_run`.
No uploaded path, at any depth and in any commit, may be the privacy state or a training log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fake_hub import FAKE_USER, FakeHub
from hf_ewtune.hub_safety import (
    HUB_IGNORE_PATTERNS,
    SafeHubApi,
    check_upload_paths,
    hub_checkpoint_notice,
    is_private_path,
    planned_upload_paths,
    trainer_uploads_through_safety_net,
)
from hf_ewtune.errors import UnsafeUploadError
from tests.test_push_to_hub import _isolated_env

STRATEGIES = ("every_save", "checkpoint", "all_checkpoints", "end")

SCRIPT = textwrap.dedent(
    r'''
    import json, os, sys, traceback
    out_root, result_path = sys.argv[1], sys.argv[2]
    from transformers import TrainingArguments
    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

    tok = tiny_tokenizer()
    data = tiny_classification_dataset(tok, n=32)
    results = {}
    for strategy in ("every_save", "checkpoint", "all_checkpoints", "end"):
        name = "dp-" + strategy.replace("_", "-")
        out = os.path.join(out_root, name)
        try:
            args = TrainingArguments(output_dir=out, hub_model_id=name, max_steps=2, per_device_train_batch_size=8,
                                     use_cpu=True, report_to="none", logging_steps=1, disable_tqdm=True,
                                     push_to_hub=True, hub_strategy=strategy, save_strategy="steps", save_steps=1)
            trainer = DPTrainer(model=tiny_bert(vocab_size=len(tok)), args=args, train_dataset=data,
                                processing_class=tok, noise_multiplier=1.0, max_grad_norm=1.0)
            trainer.train()
            trainer.save_model(os.path.join(out, "final"))  # final/_privacy_state.json (and a "Model save" push)
            trainer.save_state()                            # trainer_state.json: the non-private training loss
            trainer.save_metrics("train", {"train_loss": 0.5})  # train_results.json + all_results.json
            os.makedirs(os.path.join(out, "runs", "Dec05"), exist_ok=True)
            with open(os.path.join(out, "runs", "Dec05", "events.out.tfevents.1.host"), "wb") as f:
                f.write(b"loss")
            trainer.push_to_hub(commit_message="final")
            results[name] = {"repo_id": trainer.hub_model_id,
                             "local_states": sorted(os.path.relpath(os.path.join(r, f), out)
                                                    for r, _, fs in os.walk(out) for f in fs
                                                    if f == "_privacy_state.json")}
        except Exception:
            results[name] = {"error": traceback.format_exc()}

    # publish_run on a folder whose subfolders hold a privacy state and training logs
    from hf_ewtune.recipes.hub import publish_run
    run = os.path.join(out_root, "published")
    files = {"README.md": "---\nlicense: mit\n---\n# card\n", "model.safetensors": "w", "final/model.safetensors": "w",
             "_privacy_state.json": "{}", "final/_privacy_state.json": "{}", "final/trainer_state.json": "{}",
             "trainer_state.json": "{}", "all_results.json": "{}", "train_results.json": "{}",
             "final/eval_results.json": "{}", "runs/x/events.out.tfevents.2.host": "x", "checkpoint-1/model.safetensors": "w"}
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(run, rel)), exist_ok=True)
        with open(os.path.join(run, rel), "w") as f:
            f.write(text)
    try:
        publish_run(run, repo_id="fake-user/published")
        results["published"] = {"repo_id": "fake-user/published"}
    except Exception:
        results["published"] = {"error": traceback.format_exc()}
    with open(result_path, "w") as f:
        json.dump(results, f)
    '''
)


def _leaks(paths) -> list[str]:
    return sorted(p for p in paths if p.endswith(("_privacy_state.json", "trainer_state.json", "_results.json"))
                  or "tfevents" in p or "/_" in "/" + p)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaks")
    script = tmp / "push.py"
    script.write_text(SCRIPT, encoding="utf-8")
    with FakeHub() as hub:
        proc = subprocess.run([sys.executable, str(script), str(tmp / "runs"), str(tmp / "results.json")],
                              env=_isolated_env(hub, tmp), capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads((tmp / "results.json").read_text())
    return hub, results


def _uploaded(hub: FakeHub, repo_id: str) -> set[str]:
    return {path for commit in hub.repos[repo_id].commits for path in commit["files"]}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_push_uploads_the_privacy_state_or_training_logs(pushed, strategy):
    hub, results = pushed
    res = results["dp-" + strategy.replace("_", "-")]
    assert "error" not in res, res.get("error")
    uploaded = _uploaded(hub, res["repo_id"])
    assert _leaks(uploaded) == []
    assert not any(p.endswith("_privacy_state.json") for p in uploaded)
    # what should go up still does: the weights, the card, the model saved into a subfolder
    assert {"model.safetensors", "README.md", "final/model.safetensors", "final/config.json"} <= uploaded
    # ... while every privacy state stays on this machine
    assert {"_privacy_state.json", "final/_privacy_state.json", "checkpoint-2/_privacy_state.json"} <= set(res["local_states"])


def test_checkpoint_strategies_upload_checkpoints_without_their_state(pushed):
    hub, results = pushed
    last = _uploaded(hub, results["dp-checkpoint"]["repo_id"])
    assert {"last-checkpoint/model.safetensors", "last-checkpoint/optimizer.pt"} <= last
    assert not {"last-checkpoint/_privacy_state.json", "last-checkpoint/trainer_state.json",
                "last-checkpoint/rng_state.pth", "last-checkpoint/training_args.bin"} & last
    every = _uploaded(hub, results["dp-all-checkpoints"]["repo_id"])
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors"} <= every
    assert not any(p.startswith("checkpoint-") and p.endswith(("_privacy_state.json", "trainer_state.json")) for p in every)


def test_publish_run_leaves_nested_private_files_local(pushed):
    hub, results = pushed
    assert "error" not in results["published"], results["published"].get("error")
    uploaded = _uploaded(hub, f"{FAKE_USER}/published")
    assert uploaded == {"README.md", "model.safetensors", "final/model.safetensors"}


def test_only_expected_hub_traffic(pushed):
    hub, _ = pushed
    assert hub.unhandled == []


# ---- the pieces, in process (no network) ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["_privacy_state.json", "final/_privacy_state.json", "a/b/_privacy_state.json.tmp",
                                  "last-checkpoint/trainer_state.json", "trainer_state.json", "all_results.json",
                                  "final/eval_results.json", "results.json", "runs/Dec05/events.out.tfevents.1.h",
                                  "sub/events.out.tfevents.2", "checkpoint-3/rng_state.pth", "training_args.bin"])
def test_private_paths(path):
    assert is_private_path(path)


@pytest.mark.parametrize("path", ["model.safetensors", "final/config.json", "last-checkpoint/optimizer.pt",
                                  "README.md", "tokenizer.json", "privacy_curve.png", "adapter_config.json"])
def test_public_paths(path):
    assert not is_private_path(path)


def test_planned_paths_with_the_trainers_own_patterns_exclude_nested_state(tmp_path):
    for rel in ("model.safetensors", "final/_privacy_state.json", "final/model.safetensors", "checkpoint-1/x.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    upstream = ["_*", "checkpoint-*"]  # what transformers.Trainer passes: top level only
    assert "final/_privacy_state.json" in planned_upload_paths(tmp_path, ignore_patterns=upstream)
    safe = planned_upload_paths(tmp_path, ignore_patterns=upstream + list(HUB_IGNORE_PATTERNS), path_in_repo="r")
    assert safe == ["r/final/model.safetensors", "r/model.safetensors"]


def test_safety_net_refuses_a_commit_with_the_state_before_any_request():
    from huggingface_hub import CommitOperationAdd

    api = SafeHubApi(endpoint="http://127.0.0.1:9", token="hf_x")  # a closed port: any request would fail
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"x"),
           CommitOperationAdd(path_in_repo="final/_privacy_state.json", path_or_fileobj=b"{}")]
    with pytest.raises(UnsafeUploadError, match="final/_privacy_state.json"):
        api.create_commit("u/r", ops, commit_message="m")
    with pytest.raises(UnsafeUploadError, match="trainer_state.json"):
        check_upload_paths(["ok.bin", "last-checkpoint/trainer_state.json"])


def test_trainer_routing_is_restored_after_the_block():
    import transformers.trainer as trainer_module

    original = trainer_module.hf_api
    with trainer_uploads_through_safety_net():
        assert isinstance(trainer_module.hf_api(), SafeHubApi)
        with trainer_uploads_through_safety_net():
            assert isinstance(trainer_module.hf_api(), SafeHubApi)
        assert isinstance(trainer_module.hf_api(), SafeHubApi)
    assert trainer_module.hf_api is original


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_strategies_are_announced(strategy):
    from types import SimpleNamespace

    notice = hub_checkpoint_notice(SimpleNamespace(push_to_hub=True, hub_strategy=strategy))
    if strategy in ("checkpoint", "all_checkpoints"):
        assert "cannot be resumed from" in notice and "_privacy_state.json" in notice
    else:
        assert notice is None
    assert hub_checkpoint_notice(SimpleNamespace(push_to_hub=False, hub_strategy=strategy)) is None
