"""Packed rows, token ids and labels are refused before training (issue 11, item 6 and its extras)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

from hf_ewtune import DPTrainer
from hf_ewtune.batch_checks import check_micro_batch, check_one_record_per_row
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.testing import SAMPLE_TEXTS, tiny_bert, tiny_gpt2

from trainer_helpers import TOK, _args, _data


def _lm_data(n: int = 16, extra: list[list[int]] | None = None) -> Dataset:
    """Unpadded token lists of several lengths (a causal-LM corpus, one record per row)."""
    enc = TOK([SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(n)])
    ids = list(enc["input_ids"]) + list(extra or [])
    return Dataset.from_dict({"input_ids": ids})


def _lm_trainer(tmp_path, ds, collator, **kw):
    return DPTrainer(model=tiny_gpt2(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                     train_dataset=ds, data_collator=collator, noise_multiplier=1.0, noise_seed=0, **kw)


# ------------------------------------------------------------------------------------------- packed rows
def test_flattening_collator_puts_several_records_in_one_row_and_is_refused(tmp_path):
    ds = _lm_data()
    batch = DataCollatorWithFlattening()([ds[i] for i in range(6)])
    # The privacy problem: six records become ONE row, which DP-SGD would clip as one example.
    assert batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"][0] == 0).sum()) == 6
    with pytest.raises(PrivacyConfigError, match=r"position_ids restart inside row 0.*packing=False"):
        _lm_trainer(tmp_path, ds, DataCollatorWithFlattening())


def test_flash_attention_kwargs_and_seq_idx_refused(tmp_path):
    ds = _lm_data()
    with pytest.raises(PrivacyConfigError, match=r"'cu_seq_lens_q'.*several records"):
        _lm_trainer(tmp_path, ds, DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False))
    with pytest.raises(PrivacyConfigError, match=r"'seq_idx'.*DataCollatorWithPadding"):
        _lm_trainer(tmp_path, ds, DataCollatorWithFlattening(return_seq_idx=True, return_position_ids=False))


def test_packed_seq_lengths_column_refused(tmp_path):
    ds = _lm_data(n=8).add_column("seq_lengths", [[3]] * 7 + [[2, 4]])  # TRL's bfd packing writes this column
    with pytest.raises(PrivacyConfigError, match=r"train_dataset column 'seq_lengths'.*packed"):
        _lm_trainer(tmp_path, ds, DataCollatorForLanguageModeling(TOK, mlm=False))


def test_position_ids_check_ignores_padding():
    # Left padding (HF sets pad positions to 1) and right padding are not packing.
    check_one_record_per_row({
        "position_ids": torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 1, 1]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    })
    check_one_record_per_row({"seq_lengths": [[5], [3]], "position_ids": torch.arange(4)})
    with pytest.raises(PrivacyConfigError, match="row 1, at token 3"):
        check_one_record_per_row({"position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])})


def test_packed_micro_batch_refused_in_training_step(tmp_path):
    trainer = _lm_trainer(tmp_path, _lm_data(), DataCollatorForLanguageModeling(TOK, mlm=False))
    packed = DataCollatorWithFlattening()([trainer.train_dataset[i] for i in range(3)])
    with pytest.raises(PrivacyConfigError, match="packs several records"):
        trainer.training_step(trainer.model, packed)


def test_unpacked_lm_data_trains(tmp_path):
    trainer = _lm_trainer(tmp_path, _lm_data(), DataCollatorForLanguageModeling(TOK, mlm=False))
    trainer.train()
    assert trainer.get_privacy_spent().steps == 1


# ------------------------------------------------------------------------------------------- token ids
def test_token_id_beyond_the_vocabulary_refused_before_training(tmp_path):
    small = tiny_bert(vocab_size=20)  # TOK has far more than 20 tokens
    with pytest.raises(PrivacyConfigError, match=r"train_dataset column: 'input_ids' holds token id \d+ .*20 rows.*"
                                                 r"resize_token_embeddings"):
        DPTrainer(model=small, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)


def test_empty_input_ids_refused_before_training(tmp_path):
    ds = _lm_data(n=8, extra=[[]])
    with pytest.raises(PrivacyConfigError, match=r"'input_ids' of row 8 is empty.*filter"):
        _lm_trainer(tmp_path, ds, DataCollatorForLanguageModeling(TOK, mlm=False))


def test_column_scan_respects_the_selected_rows(tmp_path):
    ds = _data(n=32)
    bad = ds.map(lambda r, i: {"labels": 7 if i == 31 else r["labels"]}, with_indices=True)
    DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=bad.select(range(30)),
              noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match=r"'labels' holds 7, outside 0..1"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path),
                  train_dataset=bad.select(list(range(20, 32))), noise_multiplier=1.0)


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("column", ["labels", "label"])
def test_label_outside_the_classifier_refused_before_training(tmp_path, column):
    ds = _data(n=16).map(lambda r, i: {"labels": 2 if i == 5 else r["labels"]}, with_indices=True)
    if column == "label":
        ds = ds.rename_column("labels", "label")
    with pytest.raises(PrivacyConfigError, match=rf"'{column}' holds 2, outside 0..1 \(num_labels = 2\).*ClassLabel"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=ds, noise_multiplier=1.0)


def test_float_labels_refused_for_a_classifier(tmp_path):
    ds = _data(n=16)
    ds = ds.remove_columns("labels").add_column("labels", [0.7, 0.2] * 8)
    with pytest.raises(PrivacyConfigError, match=r"float label 0.7.*num_labels=1 / problem_type='regression'"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=ds, noise_multiplier=1.0)


def test_integral_float_labels_and_regression_keep_working(tmp_path):
    ds = _data(n=16)
    ints_as_floats = ds.remove_columns("labels").add_column("labels", [1.0, 0.0] * 8)
    DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=ints_as_floats,
              noise_multiplier=1.0)
    scores = ds.remove_columns("labels").add_column("labels", [0.7, -3.5] * 8)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK), num_labels=1), args=_args(tmp_path, max_steps=1),
                        train_dataset=scores, noise_multiplier=1.0, noise_seed=0)
    trainer.train()
    assert trainer.get_privacy_spent().steps == 1


def test_lm_label_beyond_the_vocabulary_refused_in_training_step(tmp_path):
    trainer = _lm_trainer(tmp_path, _lm_data(), DataCollatorForLanguageModeling(TOK, mlm=False))
    batch = DataCollatorForLanguageModeling(TOK, mlm=False)([trainer.train_dataset[i] for i in range(3)])
    batch["labels"][1, 2] = len(TOK) + 5
    with pytest.raises(PrivacyConfigError, match=r"'labels' holds \d+, outside .*vocabulary.*-100"):
        trainer.training_step(trainer.model, batch)
    batch = DataCollatorForLanguageModeling(TOK, mlm=False)([trainer.train_dataset[i] for i in range(3)])
    batch["input_ids"][0, 0] = len(TOK)
    with pytest.raises(PrivacyConfigError, match=r"the training batch: 'input_ids' holds token id"):
        trainer.training_step(trainer.model, batch)


def test_micro_batch_check_accepts_ignored_labels_and_multi_label_floats():
    model = tiny_gpt2(vocab_size=len(TOK))
    ids = torch.randint(1, len(TOK), (2, 5))
    check_micro_batch({"input_ids": ids, "labels": ids.masked_fill(ids > 50, -100)}, model=model)
    classifier = tiny_bert(vocab_size=len(TOK), num_labels=3)
    classifier.config.problem_type = "multi_label_classification"
    check_micro_batch({"input_ids": ids, "labels": torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])}, model=classifier)


def test_records_split_into_several_rows_need_a_declared_unit(tmp_path):
    enc = TOK([SAMPLE_TEXTS[i % 8] for i in range(12)], truncation=True, max_length=6, stride=2,
              return_overflowing_tokens=True)
    ds = Dataset.from_dict(dict(enc))
    assert len(ds) > 12  # long records became several rows
    with pytest.raises(PrivacyConfigError, match=r"'overflow_to_sample_mapping' repeats a record.*privacy_unit"):
        _lm_trainer(tmp_path, ds, DataCollatorForLanguageModeling(TOK, mlm=False))
    trainer = _lm_trainer(tmp_path, ds, DataCollatorForLanguageModeling(TOK, mlm=False),
                          privacy_unit="chunk of at most 6 tokens of a record")
    assert trainer.privacy_state()["privacy_unit"] == "chunk of at most 6 tokens of a record"
    one_row_each = TOK([SAMPLE_TEXTS[i % 8] for i in range(12)], truncation=True, max_length=64,
                       return_overflowing_tokens=True)
    _lm_trainer(tmp_path, Dataset.from_dict(dict(one_row_each)), DataCollatorForLanguageModeling(TOK, mlm=False))


def test_bool_labels_are_checked_without_error():
    model = tiny_bert(vocab_size=len(TOK), num_labels=2)
    ids = torch.randint(5, 50, (2, 4))
    check_micro_batch({"input_ids": ids, "labels": torch.tensor([True, False])}, model=model)
