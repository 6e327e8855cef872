"""A built DPTrainer refuses to train after what its privacy plan was derived from changed (frozen_plan.py):
otherwise the run would differ from the guarantee its privacy state and model card state."""

from __future__ import annotations

import pytest
import torch

from hf_ewtune import DPTrainer, DPTrainingArguments
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.testing import tiny_bert

from trainer_helpers import TOK, _args, _data


def _trainer(tmp_path, ds=None, **kw):
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, per_device_train_batch_size=4),
                     train_dataset=ds if ds is not None else _data(40), noise_multiplier=1.0, noise_seed=0, **kw)


def _users(n, groups):
    return _data(n).add_column("author", [f"user{i % groups}" for i in range(n)])


@pytest.mark.parametrize("change, match", [
    (lambda t: setattr(t.privacy_args, "sampling", "shuffled"), r"privacy_args\.sampling was changed from None to 'shuffled'"),
    (lambda t: setattr(t.privacy_args, "poisson_sampling", False), r"privacy_args\.poisson_sampling"),
    (lambda t: setattr(t.privacy_args, "max_grad_norm", 100.0), r"privacy_args\.max_grad_norm"),
    (lambda t: setattr(t.privacy_args, "noise_seed", None), r"privacy_args\.noise_seed"),
    (lambda t: setattr(t.args, "gradient_accumulation_steps", 4), r"args\.gradient_accumulation_steps"),
    (lambda t: setattr(t.args, "per_device_train_batch_size", 16), r"args\.per_device_train_batch_size"),
    (lambda t: setattr(t.args, "max_steps", 50), r"args\.max_steps"),
    (lambda t: setattr(t, "train_dataset", _data(20)), r"train_dataset was replaced .*40 rows.*20"),
    (lambda t: setattr(t, "train_dataset", _data(400)), r"train_dataset was replaced"),
    (lambda t: setattr(t, "model", tiny_bert(vocab_size=len(TOK))), r"model was replaced"),
    (lambda t: setattr(t.args, "group_by_length", True), r"group_by_length=True is not supported"),
    (lambda t: t.remove_callback(t.privacy_callback), r"PrivacyCallback was removed"),
    (lambda t: setattr(t, "get_train_dataloader",
                       lambda: torch.utils.data.DataLoader(t.train_dataset, batch_size=4)), r"get_train_dataloader was replaced"),
])
def test_changing_the_plan_after_construction_is_refused_before_training(tmp_path, change, match):
    trainer = _trainer(tmp_path)
    change(trainer)
    with pytest.raises(PrivacyConfigError, match=match):
        trainer.train()
    assert trainer.privacy_callback.steps == 0 and trainer.state.global_step == 0


def test_the_sampler_is_not_built_with_a_changed_sampling(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.privacy_args.sampling = "shuffled"  # the accountant certifies Poisson sampling
    with pytest.raises(PrivacyConfigError, match="Build a new DPTrainer with the sampling you want"):
        trainer.get_train_dataloader()


def test_a_user_level_dataset_regrouped_after_construction_is_refused(tmp_path):
    trainer = _trainer(tmp_path, _users(40, 10), user_id_column="author")
    trainer.train_dataset = _users(40, 40)  # same size, other users: the planned per-user groups would be wrong
    with pytest.raises(PrivacyConfigError, match="train_dataset was replaced"):
        trainer.train()
    assert trainer.privacy_callback.steps == 0


def test_privacy_fields_of_dp_training_arguments_changed_after_construction_are_refused(tmp_path):
    args = DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2,
                               per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                               noise_multiplier=1.0, noise_seed=0)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data(40))
    trainer.args.target_epsilon = 0.5  # the run was planned without a budget: it would not be enforced
    with pytest.raises(PrivacyConfigError, match=r"args\.target_epsilon was changed from None to 0\.5"):
        trainer.train()


def test_an_unchanged_trainer_still_trains_twice(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    trainer.train()
    assert trainer.privacy_callback.steps == 4


def test_an_optimizer_without_noise_is_refused_before_its_first_update(tmp_path):
    from hf_ewtune.errors import PrivacyStateError

    class PlainOptimizer(DPTrainer):
        def create_optimizer(self, model=None):  # does not call super(): no DPOptimizer, no noise
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
            return self.optimizer

    trainer = PlainOptimizer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, per_device_train_batch_size=4),
                             train_dataset=_data(40), noise_multiplier=1.0, noise_seed=0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(PrivacyStateError, match="not a DPOptimizer: its steps would add no noise"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # no noiseless update


def test_a_training_step_that_bypasses_clipping_is_refused_before_the_update(tmp_path):
    from hf_ewtune.errors import PrivacyStateError
    from hf_ewtune.sampling import is_empty_batch

    trainer = _trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def plain_backward(model, inputs, num_items_in_batch=None):  # no per-example clipping
        if is_empty_batch(inputs):
            return torch.zeros(())
        out = model(**{k: v for k, v in inputs.items() if not k.startswith("__")})
        out.loss.backward()
        return out.loss.detach()

    trainer.training_step = plain_backward
    with pytest.raises(PrivacyStateError, match="training_step ran for 0 of the 1 micro-batches"):
        trainer.train()
    assert trainer.privacy_callback.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
