"""Modules that mix the examples of a batch are rejected before training, whatever their mode (issue 11, item 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_ewtune.clipping import ClippingEngine
from hf_ewtune.errors import UnsupportedModuleError
from tests.test_clipping_oracle import loop_grads


class NormNet(nn.Module):
    """Linear -> norm -> Linear on inputs of shape [B, C, L] (so that a batch of one is valid for BatchNorm1d)."""

    def __init__(self, norm: nn.Module, c: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, c)
        self.norm = norm
        self.head = nn.Linear(c, 1)

    def forward(self, x):
        h = self.inp(x.transpose(1, 2)).transpose(1, 2)  # [B, C, L]
        h = self.norm(h)
        return self.head(h.transpose(1, 2)).mean((1, 2))


def _loss(model, batch):
    return (model(batch["x"]) - batch["y"]) ** 2


def _batch(seed: int = 0, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, 3, 5, generator=g, dtype=torch.float64),
            "y": torch.randn(b, generator=g, dtype=torch.float64)}


def _grad_of_example0_in_batch(model, batch) -> torch.Tensor:
    """Gradient of example 0's own loss w.r.t. the first layer, computed inside the whole batch's forward."""
    losses = _loss(model, batch)
    (g,) = torch.autograd.grad(losses[0], [model.inp.weight])
    return g


def test_eval_batchnorm_without_running_stats_mixes_examples_and_is_rejected():
    torch.manual_seed(0)
    # No trainable parameter of its own (affine=False), eval mode, no running statistics: the old check let it pass.
    model = NormNet(nn.BatchNorm1d(4, affine=False, track_running_stats=False)).double().eval()
    batch = _batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["x"][1] = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # The old check let this model through (eval mode, no running stats); it still uses batch statistics:
    # example 0's gradient changes when example 1 is replaced, and differs from the one-at-a-time oracle.
    g_a, g_b = _grad_of_example0_in_batch(model, batch), _grad_of_example0_in_batch(model, other)
    assert (g_a - g_b).abs().max() > 1e-3
    oracle = loop_grads(model, batch, _loss)["inp.weight"][0]
    assert (g_a - oracle).abs().max() > 1e-3
    with pytest.raises(UnsupportedModuleError, match=r"norm \(BatchNorm1d\).*GroupNorm"):
        ClippingEngine(model, max_grad_norm=1.0)


def test_groupnorm_does_not_mix_examples_and_is_accepted():
    torch.manual_seed(0)
    model = NormNet(nn.GroupNorm(2, 4)).double().train()
    batch = _batch()
    truth = loop_grads(model, batch, _loss)
    engine = ClippingEngine(model, max_grad_norm=1.0)
    got = engine.per_example_gradients(_loss(model, batch))
    for n in truth:
        torch.testing.assert_close(got[n], truth[n], msg=n)
    engine.remove()


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm1d(4),
    lambda: nn.BatchNorm1d(4, track_running_stats=False).eval(),
    lambda: nn.BatchNorm1d(4, affine=False, track_running_stats=False).eval(),
    lambda: nn.BatchNorm1d(4).requires_grad_(False).eval(),
    lambda: nn.BatchNorm1d(4, track_running_stats=False).requires_grad_(False).eval(),
    lambda: nn.BatchNorm2d(4, track_running_stats=False),
    lambda: nn.BatchNorm3d(4).eval(),
    lambda: nn.SyncBatchNorm(4, track_running_stats=False).eval(),
    lambda: nn.LazyBatchNorm1d(track_running_stats=False),
], ids=["bn1d", "bn1d-eval-nostats", "bn1d-noaffine", "bn1d-frozen", "bn1d-frozen-nostats", "bn2d", "bn3d-eval", "syncbn", "lazybn"])
def test_every_batchnorm_rejected_whatever_its_mode(make):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(make()), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match=r"Module 1\.0 \(\w*BatchNorm\w*\).*GroupNorm"):
        ClippingEngine(model, max_grad_norm=1.0)


def test_instancenorm_with_running_stats_rejected_without_accepted():
    bad = nn.Sequential(nn.Linear(4, 4), nn.InstanceNorm1d(4, track_running_stats=True))
    with pytest.raises(UnsupportedModuleError, match="track_running_stats=False"):
        ClippingEngine(bad, max_grad_norm=1.0)
    ok = nn.Sequential(nn.Linear(4, 4), nn.InstanceNorm1d(4), nn.LayerNorm(4))
    ClippingEngine(ok, max_grad_norm=1.0).remove()


def test_nllb_moe_router_rejected_by_class_name():
    class NllbMoeTop2Router(nn.Module):  # stands in for transformers' router (same class name)
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(x)

    model = nn.Sequential(nn.Linear(4, 4), NllbMoeTop2Router())
    with pytest.raises(UnsupportedModuleError, match="expert capacity"):
        ClippingEngine(model, max_grad_norm=1.0)


def test_trainer_rejects_eval_batchnorm_before_training(tmp_path):
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_classification_dataset, tiny_tokenizer

    tok = tiny_tokenizer()

    class BNClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(tok), 8)
            self.bn = nn.BatchNorm1d(8, affine=False, track_running_stats=False)
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
            return {"logits": self.head(self.bn(self.emb(input_ids).mean(1)))}

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=4, save_strategy="no")
    with pytest.raises(UnsupportedModuleError, match=r"bn \(BatchNorm1d\)"):
        DPTrainer(model=BNClassifier().eval(), args=args, train_dataset=tiny_classification_dataset(tok, n=16),
                  noise_multiplier=1.0)
