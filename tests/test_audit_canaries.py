"""Canaries (hf_ewtune.audit.canaries), run_audit's input checks, and the hf-ewtune audit command."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from audit_helpers import TOK, tiny_audit
from hf_ewtune.audit import run_audit
from hf_ewtune.audit.canaries import GradientCanaryModel, add_gradient_canaries, make_input_canaries
from hf_ewtune.cli import main
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset


def _per_example_grads(model, batch, labels):
    grads = []
    for i in range(labels.shape[0]):
        model.zero_grad()
        out = model(**{k: v[i:i + 1] for k, v in batch.items()})
        torch.nn.functional.cross_entropy(out["logits"], labels[i:i + 1]).backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in model.named_parameters()})
    return grads


def test_gradient_canary_gradient_is_a_fixed_dirac_direction_with_norm_multiple_of_c():
    base = tiny_bert(vocab_size=len(TOK), num_labels=3)
    model = GradientCanaryModel(model=base, num_canaries=5, max_grad_norm=0.5, gradient_multiple=4.0)
    enc = TOK(["a tedious, overlong mess"] * 3, padding="max_length", max_length=8, return_tensors="pt")
    batch = {**enc, "canary_index": torch.tensor([-1, 2, 4])}
    grads = _per_example_grads(model, batch, torch.tensor([1, 0, 0]))
    for row, j in ((1, 2), (2, 4)):
        expected = torch.zeros(1, 5)
        expected[0, j] = -2.0  # -(4 x C) e_j
        assert torch.allclose(grads[row]["canary.weight"], expected, atol=1e-6)
        assert all(float(g.abs().max()) == 0.0 for n, g in grads[row].items() if n != "canary.weight")
    assert float(grads[0]["canary.weight"].abs().max()) == 0.0  # ordinary rows never touch the canary weight
    with torch.no_grad():  # ordinary rows keep the wrapped model's logits
        assert torch.equal(model(**batch)["logits"][0], base(**enc)["logits"][0])


def test_gradient_canary_rows_join_the_training_set():
    data = tiny_classification_dataset(TOK, n=10)
    included = np.array([True, False, True, True])
    out = add_gradient_canaries(train_dataset=data, included=included)
    assert len(out) == 13 and out["canary_index"] == [-1] * 10 + [0, 2, 3]


def test_input_canaries_carry_a_wrong_label():
    pool = tiny_classification_dataset(TOK, n=50, seed=3)
    canaries = make_input_canaries(pool=pool, num_canaries=20, num_labels=2, seed=0)
    originals = {tuple(r["input_ids"]): r["labels"] for r in pool}
    assert len(canaries) == 20
    assert all(originals[tuple(r["input_ids"])] != r["labels"] for r in canaries)
    with pytest.raises(PrivacyConfigError, match="num_canaries=60 exceeds"):
        make_input_canaries(pool=pool, num_canaries=60, num_labels=2)


def test_an_audit_model_refuses_to_be_saved(tmp_path):
    model = GradientCanaryModel(model=tiny_bert(vocab_size=len(TOK)), num_canaries=4, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match="never saved or published"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, match", [
    (dict(kind="white-box"), "kind must be one of"),
    (dict(confidence=1.0), "confidence must be in"),
    (dict(kind="input"), "needs canary_pool"),
    (dict(num_canaries=1), "num_canaries must be"),
])
def test_bad_audit_settings_raise_before_training(tmp_path, overrides, match):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=8)
    kw = dict(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=tiny_classification_dataset(TOK, n=16),
              noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match=match):
        run_audit(**{**kw, **overrides})


def test_push_to_hub_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=8, push_to_hub=True, hub_model_id="me/x")
    with pytest.raises(PrivacyConfigError, match="push_to_hub"):
        run_audit(model=tiny_bert(vocab_size=len(TOK)), args=args,
                  train_dataset=tiny_classification_dataset(TOK, n=16), noise_multiplier=1.0)


def test_input_canary_audit_leaves_the_users_model_untouched(tmp_path):
    model = tiny_bert(vocab_size=len(TOK), hidden_size=16, num_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = tiny_audit(kind="input", num_canaries=200, model=model, tmp_path=tmp_path)
    assert report.kind == "input" and report.num_canaries == 200
    assert math.isfinite(report.certified_epsilon) and report.epsilon_lower <= report.certified_epsilon
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--push-to-hub", "me/x"], "--push-to-hub is not used by an audit"),
    (["--resume"], "--resume is not used by an audit"),
])
def test_cli_refuses_release_flags(capsys, tmp_path, argv, message):
    assert main(["audit", "--smoke", "--output-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_bad_confidence_while_parsing(capsys):
    assert main(["audit", "--confidence", "1.5"]) == 2
    assert "--confidence" in capsys.readouterr().err


@pytest.mark.slow  # a whole CLI run with LoRA (about 10 s of CPU, longer on a busy machine)
def test_cli_smoke_audit_writes_only_the_report(capsys, tmp_path):
    out = tmp_path / "audit"
    code = main(["audit", "--smoke", "--output-dir", str(out), "--canaries", "64", "--epochs", "0.5", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "certified epsilon (upper bound)" in text and "audited epsilon (lower bound, 95% confidence)" in text
    assert sorted(p.name for p in out.iterdir()) == ["audit_report.json"]
    saved = json.loads((out / "audit_report.json").read_text())
    assert saved["kind"] == "gradient" and saved["num_canaries"] == 64 and saved["violation"] is False
    assert saved["command"].startswith("hf-ewtune")
