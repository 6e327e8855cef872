"""A pooled-head run uploaded to the (fake) Hub loads back by repo id with the same predictions.

One subprocess (``HF_HUB_OFFLINE=0``, ``HF_ENDPOINT`` = the fake hub, proxies pointed at a closed port)
saves a LoRA-adapted mean-pooled MiniLM, uploads the folder with ``HfApi.upload_folder`` and rebuilds it
with ``load_pooled_classifier(repo_id)``; the test compares logits with the local rebuild.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fake_hub import FAKE_USER, FakeHub
from tests.test_push_to_hub import _isolated_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    import torch
    from huggingface_hub import HfApi
    from hf_ewtune.data import minilm_path
    from hf_ewtune.recipes.models import LoraSettings, apply_lora
    from hf_ewtune.recipes.pooling import HEAD_FILE, build_pooled_classifier, load_pooled_classifier

    folder, repo_id, result_path = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    model = build_pooled_classifier(str(minilm_path()), num_labels=2, pooling="mean", normalize=True)
    peft_model = apply_lora(model, settings=LoraSettings(r=2, alpha=4), task_type="SEQ_CLS")
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    with open(f"{folder}/{HEAD_FILE}", "w") as f:
        json.dump(dict(model.head_settings(), base_model="all-MiniLM-L6-v2"), f)
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 2025, 2204, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        local = load_pooled_classifier(folder)(input_ids=ids, attention_mask=mask).logits
        hub = load_pooled_classifier(repo_id)(input_ids=ids, attention_mask=mask).logits
    json.dump({"local": local.tolist(), "hub": hub.tolist()}, open(result_path, "w"))
    '''
)


def test_pooled_run_loads_from_hub_repo(tmp_path):
    script = tmp_path / "roundtrip.py"
    script.write_text(SCRIPT, encoding="utf-8")
    repo_id = f"{FAKE_USER}/pooled-minilm"
    with FakeHub() as hub:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), repo_id, str(tmp_path / "out.json")],
                              env=_isolated_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads(hub.file(repo_id, "pooled_head.json"))["pooling"] == "mean"
        assert hub.file(repo_id, "adapter_model.safetensors")
        downloaded = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert {"pooled_head.json", "adapter_config.json", "adapter_model.safetensors"} <= downloaded
    out = json.loads((tmp_path / "out.json").read_text())
    flat_hub, flat_local = sum(out["hub"], []), sum(out["local"], [])
    assert flat_hub == pytest.approx(flat_local, abs=1e-6)
    assert max(abs(v) for v in flat_local) > 1e-3  # a trained head, not zeros


def test_missing_head_file_is_a_clear_error(tmp_path):
    from hf_ewtune.recipes.pooling import load_pooled_classifier

    with pytest.raises(FileNotFoundError, match="pooled_head.json"):
        load_pooled_classifier(tmp_path)
