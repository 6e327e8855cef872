"""``push_to_hub`` end to end against a fake Hub at the HTTP boundary (``tests/fake_hub.py``).

One subprocess (``HF_HUB_OFFLINE=0``, ``HF_ENDPOINT`` = the fake hub on 127.0.0.1, a fake token, every
proxy pointed at a closed local port so that nothing can leave the machine) trains four tiny BERTs and
pushes them: a plain ``transformers.Trainer`` whose card gets :func:`add_privacy_to_model_card`, a
``DPTrainer`` (full fine-tuning), a LoRA ``DPTrainer``, and a ``DPTrainer`` that also pushes at every
checkpoint save during training. Nothing inside hf_ewtune or huggingface_hub is
mocked. The README.md that reaches the server must carry the privacy metadata and section, and
``ModelCard.load(repo_id)`` / ``HfApi.model_info`` (served by the fake hub) must parse it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fake_hub import FAKE_TOKEN, FAKE_USER, FakeHub
from hf_ewtune.model_card import BEGIN_MARKER, END_MARKER, PRIVACY_TAGS

SCRIPT = textwrap.dedent(
    r'''
    import json, sys, traceback
    out_root, result_path = sys.argv[1], sys.argv[2]
    from huggingface_hub import HfApi, ModelCard
    from transformers import Trainer, TrainingArguments
    from hf_ewtune.accounting import EdgeworthAccountant
    from hf_ewtune.model_card import add_privacy_to_model_card
    from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

    tok = tiny_tokenizer()
    data = tiny_classification_dataset(tok, n=32)
    results = {}

    def args_for(name):
        # "dp-every-save" also pushes at every checkpoint save, during training (hub_strategy="every_save").
        during = dict(push_to_hub=True, hub_strategy="every_save", save_strategy="steps", save_steps=1) \
            if name == "dp-every-save" else dict(save_strategy="no")
        return TrainingArguments(output_dir=f"{out_root}/{name}", hub_model_id=name, max_steps=2,
                                 per_device_train_batch_size=8, use_cpu=True, report_to="none",
                                 logging_steps=1, disable_tqdm=True, **during)

    def lora(model):
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))

    acc = EdgeworthAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.25, num_steps=2)
    STATE = {"accountant": {"name": "edgeworth", "state": acc.state_dict()}, "delta": 1e-5,
             "noise_multiplier": 1.0, "max_grad_norm": 1.0, "clipping": "flat", "sample_rate": 0.25,
             "expected_batch_size": 8, "poisson_sampling": True, "steps": 2, "epochs": 0.5, "world_size": 1,
             "calibration": None, "stopped_early": False, "target_epsilon": None,
             "library": "hf_ewtune", "library_version": "0.1.0", "format_version": 1}

    class PlainTrainerWithPrivacyCard(Trainer):
        def create_model_card(self, **kwargs):
            super().create_model_card(**kwargs)
            add_privacy_to_model_card(self.args.output_dir, STATE)

    def make(name):
        if name == "plain-full":
            return PlainTrainerWithPrivacyCard(model=tiny_bert(vocab_size=len(tok)), args=args_for(name),
                                               train_dataset=data, processing_class=tok)
        from hf_ewtune import DPTrainer
        model = tiny_bert(vocab_size=len(tok))
        if name == "dp-lora":
            model = lora(model)
        return DPTrainer(model=model, args=args_for(name), train_dataset=data, processing_class=tok,
                         noise_multiplier=1.0, max_grad_norm=1.0)

    for name in ("plain-full", "dp-full", "dp-lora", "dp-every-save"):
        try:
            trainer = make(name)
            trainer.train()
            commit = trainer.push_to_hub(commit_message=f"push {name}")
            repo_id = trainer.hub_model_id
            results[name] = {
                "repo_id": repo_id,
                "commit_url": str(getattr(commit, "commit_url", commit)),
                # Read back through the (fake) Hub, as a user would.
                "loaded_privacy": ModelCard.load(repo_id).data.to_dict().get("privacy"),
                "model_info_privacy": (HfApi().model_info(repo_id).card_data or {}).to_dict().get("privacy"),
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    with open(result_path, "w") as f:
        json.dump(results, f)
    '''
)


def _isolated_env(hub: FakeHub, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGING"))}
    dead = "http://127.0.0.1:9"  # closed port: any request that is not for 127.0.0.1 fails at once
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="0", HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead,
        http_proxy=dead, https_proxy=dead, all_proxy=dead, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    return env


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("push")
    script = tmp / "push.py"
    script.write_text(SCRIPT, encoding="utf-8")
    with FakeHub() as hub:
        proc = subprocess.run([sys.executable, str(script), str(tmp / "runs"), str(tmp / "results.json")],
                              env=_isolated_env(hub, tmp), capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads((tmp / "results.json").read_text())
    return hub, results, tmp / "runs"


def _card_from_server(hub: FakeHub, repo_id: str):
    from huggingface_hub import ModelCard

    text = hub.file(repo_id, "README.md").decode("utf-8")
    return text, ModelCard(text)


def _check_pushed_card(hub: FakeHub, results: dict, name: str) -> tuple[dict, object]:
    res = results[name]
    assert "error" not in res, res.get("error")
    repo_id = res["repo_id"]
    assert repo_id == f"{FAKE_USER}/{name}"
    text, card = _card_from_server(hub, repo_id)
    meta = card.data.to_dict()["privacy"]
    assert meta["privacy_unit"] == "example" and meta["adjacency"] == "add-or-remove-one example"
    assert meta["epsilon"] > 0 and meta["delta"] > 0 and "dp-accounting" in meta["certified_by"]
    assert meta["edgeworth_estimate"]["label"] == "estimate (not a guarantee)"
    assert meta["covers"] == "all released checkpoints" and meta["steps"] == 2
    assert set(PRIVACY_TAGS) <= set(card.data.tags)
    assert text.count(BEGIN_MARKER) == 1 and text.count(END_MARKER) == 1 and "## Privacy" in text
    assert "certified upper bound" in text and "not a guarantee" in text
    # Parsed back through the fake Hub's download and model_info endpoints.
    assert res["loaded_privacy"] == meta and res["model_info_privacy"] == meta
    files = set(hub.repos[repo_id].files)
    assert not any(f.startswith("checkpoint-") or f.endswith("rng_state.pth") for f in files)
    return meta, card


def test_plain_trainer_push_carries_privacy_card(pushed):
    hub, results, _ = pushed
    meta, card = _check_pushed_card(hub, results, "plain-full")
    assert "generated_from_trainer" in card.data.tags
    assert "model.safetensors" in hub.repos[f"{FAKE_USER}/plain-full"].files


def test_dptrainer_push(pushed):
    hub, results, runs = pushed
    meta, card = _check_pushed_card(hub, results, "dp-full")
    files = hub.repos[f"{FAKE_USER}/dp-full"].files
    assert "model.safetensors" in files and meta["steps"] == 2
    # The raw privacy state (exact q and expected batch size, hence N) stays local: never uploaded.
    assert not any(f.endswith("_privacy_state.json") for f in files)
    assert (runs / "dp-full" / "_privacy_state.json").is_file()
    assert meta["sampling"] == "Poisson" and meta["noise_multiplier"] == 1.0
    assert "not a CSPRNG" in meta.get("noise_rng", "")
    # The pushed card does not give away the dataset size (N = 32 here, expected batch 8 = q N).
    assert "expected_batch_size" not in meta and "dataset_size" not in meta


def test_lora_dptrainer_push(pushed):
    hub, results, _ = pushed
    meta, card = _check_pushed_card(hub, results, "dp-lora")
    files = hub.repos[f"{FAKE_USER}/dp-lora"].files
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert card.data.get("library_name") == "peft" and "lora" in card.data.tags


def test_report_on_pushed_dptrainer_output(pushed, capsys):
    _, results, runs = pushed
    assert "error" not in results["dp-full"], results["dp-full"].get("error")
    from hf_ewtune.cli import main

    assert main(["report", str(runs / "dp-full")]) == 0
    out = capsys.readouterr().out
    assert "Certified guarantee" in out and "Edgeworth estimate (not a guarantee)" in out


def test_only_expected_hub_traffic(pushed):
    hub, results, _ = pushed
    assert hub.unhandled == []
    assert all(not v["errors"] for v in hub.validated) and len(hub.validated) >= 3
    assert {a for a in hub.auth_headers if a} == {f"Bearer {FAKE_TOKEN}"}
    paths = {p for _, p in hub.requests}
    assert "/api/repos/create" in paths
    assert any(p.endswith("/commit/main") for p in paths) and any("/preupload/" in p for p in paths)


def test_pushes_during_training_carry_a_current_privacy_card(pushed):
    """hub_strategy="every_save": every commit that uploads weights also uploads a card whose certified
    statement covers exactly the steps taken so far (never a stale or missing privacy block)."""
    hub, results, _ = pushed
    _check_pushed_card(hub, results, "dp-every-save")
    from huggingface_hub import ModelCard

    commits = hub.repos[f"{FAKE_USER}/dp-every-save"].commits
    assert len(commits) >= 3  # step 1, step 2, end of training
    epsilons = []
    for commit in commits:
        contents = commit["contents"]
        assert "model.safetensors" in contents and "README.md" in contents, commit["summary"]
        meta = ModelCard(contents["README.md"].decode("utf-8")).data.to_dict()["privacy"]
        assert not any(f.endswith("_privacy_state.json") for f in contents)
        summary = commit["summary"]
        if summary.startswith("Training in progress, step "):
            assert meta["steps"] == int(summary.rsplit(" ", 1)[1]) >= 1
        epsilons.append(meta["epsilon"])
    assert [c["summary"] for c in commits][:2] == ["Training in progress, step 1", "Training in progress, step 2"]
    assert epsilons[0] < epsilons[1] == epsilons[-1]
