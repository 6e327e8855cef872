"""The card names the privacy unit actually trained on (PrivacyArguments.privacy_unit; issue 11, item 6)."""

from __future__ import annotations

from itertools import chain

import pytest
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from hf_ewtune import DPTrainer, PrivacyArguments
from hf_ewtune.arguments import parse_args_with_privacy
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.model_card import add_privacy_to_model_card, build_privacy_metadata, read_privacy_metadata
from hf_ewtune.testing import SAMPLE_TEXTS, tiny_gpt2

from trainer_helpers import TOK, _args

BLOCK = 16
UNIT = f"{BLOCK}-token block of the concatenated corpus"


def group_texts(examples: dict, block_size: int = BLOCK) -> dict:
    """transformers' run_clm.py grouping: concatenate every record, cut fixed blocks (records straddle blocks)."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
    result["labels"] = [list(b) for b in result["input_ids"]]
    return result


def _grouped_corpus() -> Dataset:
    records = Dataset.from_dict({"input_ids": TOK([SAMPLE_TEXTS[i % 8] for i in range(40)])["input_ids"]})
    return records.map(group_texts, batched=True, remove_columns=records.column_names)


def test_group_texts_blocks_cut_across_records():
    lengths = [len(ids) for ids in TOK(list(SAMPLE_TEXTS))["input_ids"]]
    assert any(n % BLOCK for n in lengths)  # so some record is split between two blocks
    ds = _grouped_corpus()
    assert set(len(r) for r in ds["input_ids"]) == {BLOCK}


def test_declared_unit_reaches_the_state_and_the_card(tmp_path):
    ds = _grouped_corpus()
    trainer = DPTrainer(model=tiny_gpt2(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                        train_dataset=ds, data_collator=default_data_collator, noise_multiplier=1.0, noise_seed=0,
                        privacy_unit=UNIT)
    trainer.train()
    state = trainer.privacy_state()
    assert state["privacy_unit"] == UNIT
    add_privacy_to_model_card(tmp_path / "card", state)
    meta = read_privacy_metadata(tmp_path / "card")
    assert meta["privacy_unit"] == UNIT
    assert meta["adjacency"] == f"add-or-remove-one {UNIT}"
    text = (tmp_path / "card" / "README.md").read_text()
    assert f"The privacy unit is one **{UNIT}**" in text
    assert "**not** a per-record guarantee" in text
    assert "one training **example**" not in text


def test_default_unit_is_example(tmp_path):
    ds = _grouped_corpus()
    trainer = DPTrainer(model=tiny_gpt2(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                        train_dataset=ds, data_collator=default_data_collator, noise_multiplier=1.0, noise_seed=0)
    state = trainer.privacy_state()
    assert state["privacy_unit"] == "example"
    add_privacy_to_model_card(tmp_path, state)
    assert read_privacy_metadata(tmp_path)["privacy_unit"] == "example"
    assert "The privacy unit is one training **example**" in (tmp_path / "README.md").read_text()


def test_older_states_still_read_as_example():
    from hf_ewtune.accounting import PLDAccountant

    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=3)
    state = {"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5, "poisson_sampling": True,
             "steps": 3, "privacy_unit": "one training example (add/remove adjacency)"}
    meta = build_privacy_metadata(state)
    assert meta["privacy_unit"] == "example" and meta["adjacency"] == "add-or-remove-one example"


@pytest.mark.parametrize("bad", ["", "   ", "two\nlines", "x" * 201, 3])
def test_invalid_privacy_unit_refused(bad):
    with pytest.raises(PrivacyConfigError, match="privacy_unit"):
        PrivacyArguments(noise_multiplier=1.0, privacy_unit=bad)


def test_privacy_unit_on_the_command_line():
    _, pargs = parse_args_with_privacy(TrainingArguments, args=["--output_dir", "/tmp/o", "--noise_multiplier", "1",
                                                                 "--privacy_unit", UNIT])
    assert pargs.privacy_unit == UNIT
