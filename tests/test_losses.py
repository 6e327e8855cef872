"""Per-example losses equal the loss of a one-example computation; padding/-100 masked per sequence."""

from __future__ import annotations

import pytest
import torch

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.losses import infer_task, per_example_loss
from hf_ewtune.testing import tiny_bert, tiny_gpt2, tiny_tokenizer


def test_classification_matches_single_example_hf_loss():
    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tok)).eval()
    texts = ["a gripping film", "dull characters and a lifeless script", "warm"]
    enc = tok(texts, padding="max_length", max_length=12, return_tensors="pt")
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        logits = model(**enc).logits
        task = infer_task(model, logits, labels)
        assert task == "classification"
        losses = per_example_loss(logits, labels, task=task)
        for i in range(3):
            single = model(**{k: v[i : i + 1] for k, v in enc.items()}, labels=labels[i : i + 1]).loss
            assert torch.allclose(losses[i], single, atol=1e-5)


def test_causal_lm_mean_over_own_tokens_matches_single_example():
    tok = tiny_tokenizer(kind="bpe")
    model = tiny_gpt2(vocab_size=len(tok)).eval()
    texts = ["one of the best movies of the year", "a tedious mess", "i wanted my two hours back too"]
    enc = tok(texts, padding=True, truncation=True, max_length=60, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(**enc).logits
        task = infer_task(model, logits, labels)
        assert task == "causal_lm"
        losses = per_example_loss(logits, labels, task=task, attention_mask=enc["attention_mask"])
        for i in range(3):
            n_tok = int(enc["attention_mask"][i].sum())
            ids = enc["input_ids"][i : i + 1, :n_tok]
            single = model(input_ids=ids, labels=ids).loss  # HF: mean over the shifted tokens of ONE sequence
            assert torch.allclose(losses[i], single, atol=1e-5)
    # Sequences of different lengths are not coupled: changing example 1 leaves example 0's loss unchanged.
    labels2 = labels.clone()
    labels2[1, 2:] = -100
    with torch.no_grad():
        losses2 = per_example_loss(logits, labels2, task="causal_lm", attention_mask=enc["attention_mask"])
    assert torch.allclose(losses2[0], losses[0]) and not torch.allclose(losses2[1], losses[1])


def test_padding_masked_by_attention_mask_even_without_minus_100():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    full = per_example_loss(logits, labels, task="causal_lm", attention_mask=mask)
    manual = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    assert torch.allclose(full[0], manual, atol=1e-6)


def test_token_task_unshifted_and_regression_and_multilabel():
    logits = torch.randn(3, 4, 6)
    labels = torch.randint(0, 6, (3, 4))
    labels[0, 3] = -100
    out = per_example_loss(logits, labels, task="token")
    ref0 = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, :3])
    assert torch.allclose(out[0], ref0, atol=1e-6)

    pred = torch.tensor([[1.0], [2.0]])
    target = torch.tensor([0.5, 4.0])
    assert torch.allclose(per_example_loss(pred, target, task="regression"), torch.tensor([0.25, 4.0]))
    assert infer_task(None, pred, target) == "regression"

    ml_logits = torch.randn(2, 3)
    ml_labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert infer_task(None, ml_logits, ml_labels) == "multi_label"
    ml = per_example_loss(ml_logits, ml_labels, task="multi_label")
    ref = torch.nn.functional.binary_cross_entropy_with_logits(ml_logits[1], ml_labels[1])
    assert torch.allclose(ml[1], ref, atol=1e-6)


def test_bf16_logits_are_upcast():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    out = per_example_loss(logits, torch.tensor([0, 1, 2, 0]), task="classification")
    assert out.dtype == torch.float32 and out.shape == (4,)


def test_unknown_task_raises():
    with pytest.raises(PrivacyConfigError):
        per_example_loss(torch.randn(2, 3), torch.tensor([0, 1]), task="nope")
    with pytest.raises(PrivacyConfigError):
        infer_task(None, torch.randn(2, 3, 4, 5), torch.zeros(2))
