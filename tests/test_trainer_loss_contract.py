"""DPTrainer trains on compute_per_example_loss; transformers' loss settings are honoured per example or rejected."""

import pytest
import torch
import torch.nn.functional as F
from transformers.trainer_pt_utils import LabelSmoother

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.losses import per_example_loss
from hf_ewtune.testing import tiny_bert
from trainer_helpers import TOK, _args, _data


def _batch(n=4):
    rows = _data(n=n)[:n]
    return {k: torch.tensor(v) for k, v in rows.items()}


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_per_example_matches_label_smoother_on_each_example(eps):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    ours = per_example_loss(logits, labels, task="classification", label_smoothing=eps)
    ref = torch.stack([LabelSmoother(epsilon=eps)({"logits": logits[i:i + 1]}, labels[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(ours, ref)
    tok_logits = torch.randn(3, 6, 7, generator=g)
    tok_labels = torch.randint(0, 7, (3, 6), generator=g)
    tok_labels[0, 4:] = -100
    ours = per_example_loss(tok_logits, tok_labels, task="causal_lm", label_smoothing=eps)
    ref = torch.stack([LabelSmoother(epsilon=eps)({"logits": tok_logits[i:i + 1]}, tok_labels[i:i + 1], shift_labels=True)
                       for i in range(3)])
    torch.testing.assert_close(ours, ref)


def test_trainer_honours_label_smoothing_factor_per_example(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.2), train_dataset=_data(),
                        noise_multiplier=1.0)
    batch = _batch()
    losses = trainer.compute_per_example_loss(model, batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    ref = torch.stack([LabelSmoother(epsilon=0.2)({"logits": logits[i:i + 1]}, labels[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(losses, ref)
    assert not torch.allclose(losses, F.cross_entropy(logits, labels, reduction="none"))


def test_label_smoothing_with_a_regression_task_is_rejected_at_construction(tmp_path):
    with pytest.raises(PrivacyConfigError, match="label_smoothing_factor"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK), num_labels=1), args=_args(tmp_path, label_smoothing_factor=0.1),
                  train_dataset=_data(), noise_multiplier=1.0, per_example_loss_task="regression")


def test_compute_loss_func_is_called_once_per_example_in_training(tmp_path):
    seen = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        seen.append(outputs.logits.shape[0])
        return 2.0 * F.cross_entropy(outputs.logits, labels)

    model = tiny_bert(vocab_size=len(TOK))
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data(), noise_multiplier=1.0,
                        noise_seed=0, compute_loss_func=loss_func)
    batch = _batch()
    losses = trainer.compute_per_example_loss(model, batch)
    labels = batch.pop("labels")
    torch.testing.assert_close(losses, 2.0 * F.cross_entropy(model(**batch).logits, labels, reduction="none"))
    seen.clear()
    trainer.train()
    assert seen and set(seen) == {1}  # old main: never called


def test_compute_loss_override_alone_is_rejected_at_construction(tmp_path):
    class MyTrainer(DPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(PrivacyConfigError, match="compute_per_example_loss"):
        MyTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)


def test_overridden_compute_per_example_loss_is_what_training_uses(tmp_path):
    calls = []

    class MyTrainer(DPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # evaluation only
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def compute_per_example_loss(self, model, inputs):
            calls.append(inputs["labels"].shape[0])
            return super().compute_per_example_loss(model, inputs) * 0.5

    trainer = MyTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=2), train_dataset=_data(),
                        noise_multiplier=1.0, noise_seed=0, max_physical_batch_size=3)
    trainer.train()
    assert calls and max(calls) <= 3  # called per physical chunk


def test_a_batch_loss_from_compute_per_example_loss_is_rejected(tmp_path):
    class MeanTrainer(DPTrainer):
        def compute_per_example_loss(self, model, inputs):
            return super().compute_per_example_loss(model, inputs).mean()

    trainer = MeanTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1), train_dataset=_data(),
                          noise_multiplier=1.0, noise_seed=0)
    with pytest.raises(PrivacyConfigError, match=r"compute_per_example_loss must return one loss per example"):
        trainer.train()


def test_compute_loss_func_never_sees_batch_level_outputs():
    from hf_ewtune.loss_contract import losses_one_at_a_time

    seen = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        seen.append(outputs["aux_loss"])
        return F.cross_entropy(outputs["logits"], labels)

    logits = torch.randn(3, 2, requires_grad=True)
    outputs = {"logits": logits, "aux_loss": logits.sum()}  # a batch-level value mixes examples
    losses = losses_one_at_a_time(loss_func, outputs, torch.tensor([0, 1, 1]))
    assert losses.shape == (3,) and seen == [None, None, None]
    grads = torch.autograd.grad(losses[0], logits)[0]
    assert grads[1:].abs().sum() == 0  # example 0's loss depends on example 0 only
