"""Privacy model card: metadata round trips on real Trainer / PEFT cards, idempotence, PEFT survival."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_ewtune.accounting import EdgeworthAccountant, PLDAccountant
from hf_ewtune.errors import PrivacyStateError
from hf_ewtune.model_card import (
    BEGIN_MARKER,
    END_MARKER,
    NOT_POISSON,
    PRIVACY_TAGS,
    _ceil_sig,
    add_privacy_tags,
    add_privacy_to_model_card,
    build_privacy_metadata,
    read_privacy_metadata,
    render_privacy_section,
)


def make_state(*, accountant: str = "edgeworth", poisson: bool = True, steps: int = 40, sigma: float = 1.1,
               q: float = 0.05, **extra) -> dict:
    acc = EdgeworthAccountant() if accountant == "edgeworth" else PLDAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    state = {
        "format_version": 1, "library": "hf_ewtune", "library_version": "0.1.0",
        "accountant": {"name": acc.name, "state": acc.state_dict()}, "delta": 1e-5, "target_epsilon": None,
        "noise_multiplier": sigma, "max_grad_norm": 0.5, "clipping": "flat", "sample_rate": q,
        "expected_batch_size": 4, "poisson_sampling": poisson, "steps": steps, "epochs": steps * q,
        "world_size": 1, "calibration": None, "stopped_early": False,
    }
    state.update(extra)
    return state


def _train_tiny(output_dir: Path, *, lora: bool) -> None:
    """Two optimizer steps of a tiny BERT with the plain transformers Trainer, then its model card."""
    from transformers import Trainer, TrainingArguments

    from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tok))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_classification_dataset(tok, n=8),
                      processing_class=tok)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name=output_dir.name)
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    out = {}
    for name, lora in (("full", False), ("lora", True)):
        trainer = _train_tiny(root / name, lora=lora)
        out[name] = (root / name, trainer.model)
    return out


def _readme(d: Path) -> str:
    return (d / "README.md").read_text(encoding="utf-8")


def _check_card(d: Path, state: dict) -> dict:
    from huggingface_hub import ModelCard

    card = ModelCard.load(d / "README.md")
    meta = read_privacy_metadata(d)
    expected_eps = PLDAccountant()
    expected_eps.load_state_dict({**state["accountant"]["state"], "accountant": "pld"})
    assert meta["epsilon"] == pytest.approx(expected_eps.get_epsilon(state["delta"]), rel=1e-9)
    assert meta["delta"] == state["delta"]
    assert "PLD" in meta["certified_by"] and "dp-accounting" in meta["certified_by"]
    assert meta["edgeworth_estimate"]["label"] == "estimate (not a guarantee)"
    assert meta["privacy_unit"] == "example" and meta["adjacency"] == "add-or-remove-one example"
    assert meta["covers"] == "all released checkpoints"
    assert meta["noise_multiplier"] == state["noise_multiplier"] and meta["steps"] == state["steps"]
    assert set(PRIVACY_TAGS) <= set(card.data.tags)
    text = card.text
    assert text.count(BEGIN_MARKER) == 1 and text.count(END_MARKER) == 1
    assert "## Privacy" in text and "certified upper bound" in text and "not a guarantee" in text
    json.dumps(card.data.to_dict(), allow_nan=False)  # the Hub stores metadata as strict JSON
    return meta


def test_full_finetune_card_round_trip(trained):
    out, _ = trained["full"]
    state = make_state()
    before = _readme(out)
    assert "generated_from_trainer" in before and "privacy:" not in before
    add_privacy_to_model_card(str(out), state)
    meta = _check_card(out, state)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "generated_from_trainer" in card.data.tags  # Trainer's tags kept
    assert "## Training procedure" in card.text  # Trainer's text kept, Privacy inserted before it
    assert card.text.index("## Privacy") < card.text.index("## Training procedure")
    assert meta["sampling"] == "Poisson" and meta["accountant"] == "edgeworth"


def test_lora_card_round_trip_and_peft_tags(trained):
    out, _ = trained["lora"]
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.get("library_name") == "peft"
    state = make_state(accountant="pld")
    add_privacy_to_model_card(out, state)
    meta = _check_card(out, state)
    card = ModelCard.load(out / "README.md")
    assert card.data.get("library_name") == "peft" and "lora" in card.data.tags
    assert meta["accountant"] == "pld"


def test_idempotent_rerender(tmp_path):
    state = make_state()
    add_privacy_to_model_card(tmp_path, state)
    first = _readme(tmp_path)
    add_privacy_to_model_card(tmp_path, state)
    assert _readme(tmp_path) == first
    # A later state (more steps) replaces the section instead of adding a second one.
    later = make_state(steps=80)
    add_privacy_to_model_card(tmp_path, later)
    text = _readme(tmp_path)
    assert text.count(BEGIN_MARKER) == 1 and text.count("## Privacy") == 1
    assert read_privacy_metadata(tmp_path)["steps"] == 80
    assert read_privacy_metadata(tmp_path)["epsilon"] > build_privacy_metadata(state)["epsilon"]
    from huggingface_hub import ModelCard

    tags = ModelCard.load(tmp_path / "README.md").data.tags
    assert sorted(tags) == sorted(set(tags))  # no duplicated tags after three renders


def test_user_text_outside_markers_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("---\ntags:\n- mine\nlicense: mit\n---\n\n# My model\n\nHand-written intro.\n\n"
                                        "## Usage\n\nCall it.\n", encoding="utf-8")
    add_privacy_to_model_card(tmp_path, make_state())
    add_privacy_to_model_card(tmp_path, make_state(steps=60))
    text = _readme(tmp_path)
    assert "Hand-written intro." in text and "## Usage\n\nCall it." in text
    assert text.index("## Privacy") < text.index("## Usage")
    from huggingface_hub import ModelCard

    data = ModelCard.load(tmp_path / "README.md").data
    assert data.license == "mit" and data.tags[0] == "mine"


def _peft_model():
    from peft import LoraConfig, get_peft_model

    from hf_ewtune.testing import tiny_bert

    return get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))


def test_peft_save_after_our_card_keeps_privacy_block(tmp_path):
    """Order: ours, then peft's save_pretrained. PEFT rewrites ``tags`` only; the privacy block and section
    survive, and re-applying ours (idempotent) restores the tags."""
    state = make_state()
    add_privacy_to_model_card(tmp_path, state)
    _peft_model().save_pretrained(tmp_path)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.get("library_name") == "peft"
    assert read_privacy_metadata(tmp_path)["steps"] == state["steps"]
    assert card.text.count(BEGIN_MARKER) == 1
    assert not set(PRIVACY_TAGS) <= set(card.data.tags or [])  # documented PEFT behaviour: tags replaced
    add_privacy_to_model_card(tmp_path, state)
    assert set(PRIVACY_TAGS) <= set(ModelCard.load(tmp_path / "README.md").data.tags)


def test_add_privacy_tags_survives_peft_rewrite(tmp_path):
    """With the base model tagged (what DPTrainer does), PEFT's card rewrite keeps our tags."""
    add_privacy_to_model_card(tmp_path, make_state())
    model = _peft_model()
    add_privacy_tags(model)
    model.save_pretrained(tmp_path)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert set(PRIVACY_TAGS) <= set(card.data.tags) and "lora" in card.data.tags
    assert "privacy" in card.data.to_dict()


def test_trainer_then_peft_then_ours(tmp_path, trained):
    """Order: Trainer card, then a PEFT save into the same folder, then ours."""
    import shutil

    out, _ = trained["full"]
    shutil.copy(out / "README.md", tmp_path / "README.md")
    _peft_model().save_pretrained(tmp_path)
    state = make_state()
    add_privacy_to_model_card(tmp_path, state)
    _check_card(tmp_path, state)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert "lora" in card.data.tags and card.data.get("library_name") == "peft"


def test_dataset_size_hidden_unless_opted_in():
    state = make_state(expected_batch_size=115, dataset_size=11476,
                       calibration={"sigma_ew": 1.0, "sigma_final": 1.1, "num_examples": 11476})
    meta = build_privacy_metadata(state)
    blob = json.dumps(meta) + render_privacy_section(state, metadata=meta)
    assert "11476" not in blob and "expected_batch_size" not in blob
    assert meta["calibration"] == {"sigma_ew": 1.0, "sigma_final": 1.1}
    opted = build_privacy_metadata(state, include_dataset_size=True)
    assert opted["dataset_size"] == 11476 and opted["expected_batch_size"] == 115
    assert "11476" in render_privacy_section(state, include_dataset_size=True)


def test_not_poisson_is_stated():
    state = make_state(poisson=False)
    meta = build_privacy_metadata(state)
    assert meta["sampling"] == NOT_POISSON
    assert "ASSUMES Poisson" in render_privacy_section(state, metadata=meta)
    assert build_privacy_metadata(make_state())["sampling"] == "Poisson"


def test_edgeworth_bound_not_certifiable_is_labelled():
    meta = build_privacy_metadata(make_state())
    bound = meta["edgeworth_estimate"]["error_bound"]
    # At delta = 1e-5 and a few dozen steps the explicit bound cannot certify anything (accountant.md sec. 6).
    assert isinstance(bound, dict) and bound["delta_y"] > 1e-5
    assert isinstance(bound["epsilon_interval"], str) and bound["epsilon_interval"].startswith("not certifiable")
    assert not bound["epsilon_interval"].lower().startswith("not certifiable: not certifiable")
    assert meta["edgeworth_estimate"]["order_1"] > 0


def test_readable_epsilon_rounds_up():
    assert _ceil_sig(7.9312) == "7.94" and _ceil_sig(0.123401) == "0.124" and _ceil_sig(2.0) == "2.00"
    assert _ceil_sig(2.9900000000001) == "3.00" and _ceil_sig(0.1) == "0.100"
    assert _ceil_sig(math.inf) == "∞"
    state = make_state()
    eps = build_privacy_metadata(state)["epsilon"]
    shown = render_privacy_section(state).split("ε = ", 1)[1].split(" ", 1)[0]
    assert float(shown) >= eps


def test_flat_accountant_state_layout_is_accepted():
    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    flat = {"accountant": "pld", "accountant_state": acc.state_dict(), "delta": 1e-5, "steps": 10,
            "poisson_sampling": True}
    meta = build_privacy_metadata(flat)
    assert meta["epsilon"] == pytest.approx(acc.get_epsilon(1e-5)) and meta["accountant"] == "pld"


def test_missing_card_and_missing_block(tmp_path):
    with pytest.raises(PrivacyStateError, match="no model card"):
        read_privacy_metadata(tmp_path)
    (tmp_path / "README.md").write_text("---\ntags:\n- x\n---\n# hi\n", encoding="utf-8")
    with pytest.raises(PrivacyStateError, match="no 'privacy' metadata"):
        read_privacy_metadata(tmp_path / "README.md")
    with pytest.raises(PrivacyStateError, match="accountant"):
        build_privacy_metadata({"delta": 1e-5, "steps": 3})


def test_sampling_rate_is_rounded_up_unless_opted_in():
    """q = B / N and the Trainer's card lists B: the exact q would give N away."""
    q = 256 / 11476
    state = make_state(q=q, steps=10)
    meta = build_privacy_metadata(state)
    assert meta["sampling_rate"] == 0.0224 >= q and "rounded up" in meta["sampling_rate_note"]
    assert "(rounded up)" in render_privacy_section(state, metadata=meta)
    # An epsilon recomputed from the published (rounded) q is still an upper bound on the certified one.
    acc = PLDAccountant()
    acc.step(noise_multiplier=state["noise_multiplier"], sample_rate=meta["sampling_rate"], num_steps=10)
    assert acc.get_epsilon(state["delta"]) >= meta["epsilon"]
    exact = build_privacy_metadata(state, include_dataset_size=True)
    assert exact["sampling_rate"] == q and "sampling_rate_note" not in exact
    assert build_privacy_metadata(make_state(q=0.05))["sampling_rate"] == 0.05  # already short: unchanged


def test_dp_card_withholds_the_non_private_training_loss(tmp_path):
    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert
    from hf_ewtune.trainer import WITHHELD_LOSS
    from tests.trainer_helpers import TOK, _args, _data

    args = _args(tmp_path, max_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data(), eval_dataset=_data(n=16),
                        processing_class=TOK, noise_multiplier=1.0, max_grad_norm=1.0)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(isinstance(v, float) for v in losses)
    trainer.create_model_card(model_name="tiny-dp")
    card = _readme(tmp_path)
    results = card.split("### Training results", 1)[1].split("###", 1)[0]
    assert "Validation Loss" in results and WITHHELD_LOSS in results  # the table is there, its training loss is not
    for value in losses:
        assert f"{value:.4f}" not in results
    assert "does not cover the training loss" in card
    # the trainer's own history is untouched (the console/log callbacks still see the losses)
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == losses


def test_training_logs_that_push_to_hub_would_upload_are_found(tmp_path):
    from hf_ewtune.trainer import non_private_logs

    (tmp_path / "runs" / "Nov22").mkdir(parents=True)
    event = tmp_path / "runs" / "Nov22" / "events.out.tfevents.1.host"
    event.write_bytes(b"x")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "events.out.tfevents.2.host").write_bytes(b"x")  # not uploaded by push_to_hub
    (tmp_path / "_private").mkdir()
    (tmp_path / "_private" / "events.out.tfevents.3.host").write_bytes(b"x")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert non_private_logs(str(tmp_path)) == [str(event)]
    event.unlink()
    assert non_private_logs(str(tmp_path)) == []
