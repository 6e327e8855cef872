"""hf_ewtune.testing.check_per_example_gradients: the public one-example-at-a-time oracle."""

import pytest
import torch

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.testing import check_per_example_gradients, tiny_bert, tiny_gpt2


def _bert_batch(b=3, t=8):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(5, 200, (b, t), generator=g), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_bert_passes_with_the_default_loss(clipping):
    model = tiny_bert()
    report = check_per_example_gradients(model, _bert_batch(), max_grad_norm=0.01, clipping=clipping)
    assert report.ok and report.max_abs_error < 1e-10 and report.clipped_sum_max_abs_error < 1e-10
    assert report.rules["bert.embeddings.word_embeddings"] == "EmbeddingRule"
    assert next(model.parameters()).dtype == torch.float32 and not any(p.grad is not None for p in model.parameters())


def test_gpt2_causal_lm_passes_with_tied_embeddings():
    ids = torch.randint(1, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    report = check_per_example_gradients(tiny_gpt2(), {"input_ids": ids, "labels": ids.clone()})
    assert report.ok and "transformer.wte.weight" in report.errors


def test_a_model_with_live_hooks_is_refused():
    model = torch.nn.Linear(2, 1)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="remove_hooks"):
        check_per_example_gradients(model, {"x": torch.randn(2, 2)}, lambda m, b: m(b["x"]).squeeze(1))
    engine.remove()
    assert check_per_example_gradients(model, {"x": torch.randn(2, 2)}, lambda m, b: m(b["x"]).squeeze(1)).ok
