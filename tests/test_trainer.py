"""DPTrainer: exact clipped update against a per-example oracle, PrivacyArguments parsing, validation errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_ewtune import DPTrainer, PrivacyArguments
from hf_ewtune.errors import BudgetExhaustedError, PrivacyConfigError, UnsupportedModuleError
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data, _trainable


def test_one_step_update_equals_mean_of_clipped_per_example_gradients(tmp_path):
    """noise 0, fixed-size batch = whole dataset, SGD lr=1: update == -(1/N) sum_i clip(g_i).

    Two micro-batches of 4 (GA=2), each processed in physical chunks of at most 3 examples.
    """
    c = 0.05
    n = 8
    ds = _data(n=n)
    ds = ds.add_column("text", ["unused column"] * n)  # removed by remove_unused_columns
    model = tiny_bert(vocab_size=len(TOK))
    reference = copy.deepcopy(model)
    before = _trainable(model)
    args = _args(
        tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
    )
    with pytest.warns(UserWarning, match="NO differential privacy"):
        trainer = DPTrainer(model=model, args=args, train_dataset=ds, noise_multiplier=0.0, max_grad_norm=c,
                            poisson_sampling=False, noise_seed=0, max_physical_batch_size=3)
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's own clipping is disabled
    assert trainer.sample_rate == 1.0 and trainer.expected_batch_size == 8
    trainer.train()
    after = _trainable(model)

    # Ground truth: loop of single-example backward passes on an untouched copy.
    reference.train()
    params = {nm: p for nm, p in reference.named_parameters() if p.requires_grad}
    total = {nm: torch.zeros_like(p) for nm, p in params.items()}
    clipped_any = False
    for i in range(n):
        reference.zero_grad()
        ex = {k: torch.tensor([ds[i][k]]) for k in ds.column_names if k not in ("text", "labels")}
        reference(**ex, labels=torch.tensor([ds[i]["labels"]])).loss.backward()
        grads = {nm: (p.grad if p.grad is not None else torch.zeros_like(p)) for nm, p in params.items()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        factor = min(1.0, c / (norm + 1e-6))
        clipped_any |= factor < 1.0
        for nm in total:
            total[nm] += factor * grads[nm]
    assert clipped_any
    for nm in total:
        expected = -total[nm] / n
        assert torch.allclose(after[nm] - before[nm], expected, atol=1e-6, rtol=1e-4), nm
    assert trainer.get_privacy_spent().steps == 1
    state = trainer.privacy_state()
    # Shuffled batches are certified by their own bound (this assertion used to codify "ASSUMES Poisson").
    assert state["poisson_sampling"] is False and "shuffled-batch bound" in state["sampling_note"]
    assert state["accountant"] == "shuffled"
    assert math.isinf(trainer.get_privacy_spent().epsilon)


def test_privacy_arguments_from_hf_argument_parser():
    parser = HfArgumentParser(PrivacyArguments)
    (pa,) = parser.parse_args_into_dataclasses(
        ["--target_epsilon", "3", "--max_grad_norm", "0.5", "--accountant", "pld", "--poisson_sampling", "false"]
    )
    assert pa.target_epsilon == 3.0 and pa.max_grad_norm == 0.5 and pa.accountant == "pld"
    assert pa.poisson_sampling is False and pa.noise_multiplier is None and pa.noise_seed is None
    with pytest.raises(TypeError):
        PrivacyArguments(3.0)  # keyword-only
    with pytest.raises(PrivacyConfigError):
        PrivacyArguments(accountant="gdp")
    with pytest.raises(PrivacyConfigError):
        PrivacyArguments(max_grad_norm=0)


def test_privacy_and_training_arguments_parse_together(tmp_path):
    from hf_ewtune.arguments import parse_args_with_privacy

    with pytest.raises(Exception):  # both own --max_grad_norm: a plain joint parser cannot be built
        HfArgumentParser((TrainingArguments, PrivacyArguments))
    targs, pa = parse_args_with_privacy(TrainingArguments, args=[
        "--output_dir", str(tmp_path), "--max_grad_norm", "2.0", "--per_example_max_grad_norm", "0.25",
        "--noise_multiplier", "1.5", "--clipping", "per_layer",
    ])
    assert targs.max_grad_norm == 2.0 and isinstance(pa, PrivacyArguments)
    assert pa.max_grad_norm == 0.25 and pa.noise_multiplier == 1.5 and pa.clipping == "per_layer"


def test_neither_target_nor_noise_raises(tmp_path):
    with pytest.raises(PrivacyConfigError, match="target_epsilon"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data())


def test_budget_that_cannot_afford_one_step_raises(tmp_path):
    with pytest.raises(BudgetExhaustedError):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                  noise_multiplier=1.0, target_epsilon=0.01)


def test_batch_larger_than_dataset_raises(tmp_path):
    with pytest.raises(PrivacyConfigError, match="exceeds the dataset size"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, per_device_train_batch_size=64),
                  train_dataset=_data(n=32), noise_multiplier=1.0)


def test_iterable_or_missing_dataset_raises(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(PrivacyConfigError, match="length"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=Stream(), noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match="train_dataset"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), noise_multiplier=1.0)


def test_privacy_args_and_kwargs_together_raise(tmp_path):
    with pytest.raises(PrivacyConfigError, match="either"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                  privacy_args=PrivacyArguments(noise_multiplier=1.0), target_epsilon=2.0)


class _BNModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(len(TOK), 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        return {"logits": self.head(self.bn(self.emb(input_ids).mean(1)))}


def test_batchnorm_model_rejected_before_training(tmp_path):
    with pytest.raises(UnsupportedModuleError):
        DPTrainer(model=_BNModel(), args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)


def test_custom_samplers_rejected(tmp_path):
    class WeightedTrainer(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.WeightedRandomSampler([1.0] * 32, 32)

    with pytest.raises(PrivacyConfigError, match="sampler"):
        WeightedTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path), train_dataset=_data(),
                        noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match="group_by_length"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, train_sampling_strategy="group_by_length"),
                  train_dataset=_data(), noise_multiplier=1.0)


def test_second_trainer_on_the_same_model_replaces_the_hooks(tmp_path):
    model = tiny_bert(vocab_size=len(TOK))
    n_hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    first = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    hooks_one = n_hooks()
    assert hooks_one > 0
    second = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), noise_multiplier=1.0)
    assert n_hooks() == hooks_one and second._engine is not first._engine
