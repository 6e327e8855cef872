"""Budget enforcement across an interruption: the resumed run stops where the uninterrupted one does."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback, TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.accounting import make_accountant
from hf_ewtune.errors import BudgetExhaustedError
from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
DATA = tiny_classification_dataset(TOK, n=32)
SIGMA, Q, DELTA = 1.0, 0.25, 1e-5


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True
        return control


def _target(steps: int) -> float:
    acc = make_accountant("pld")
    acc.step(noise_multiplier=SIGMA, sample_rate=Q, num_steps=steps)
    return acc.get_epsilon(DELTA) * 1.001


def _trainer(out, target, callbacks=None):
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=6, per_device_train_batch_size=8,
        save_strategy="steps", save_steps=2, logging_steps=100, disable_tqdm=True,
    )
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=DATA, callbacks=callbacks,
                     noise_multiplier=SIGMA, target_epsilon=target, target_delta=DELTA, noise_seed=5)


def test_resumed_run_stops_at_the_same_budget_step(tmp_path):
    target = _target(3)  # 3 of the 6 planned steps fit
    first = _trainer(tmp_path, target, callbacks=[_Interrupt()])
    first.train()
    assert first.state.global_step == 2 and not first.privacy_callback.stopped_early

    second = _trainer(tmp_path, target)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.privacy_callback.budget_steps == 3
    assert second.state.global_step == 3 and second.privacy_callback.stopped_early
    assert second.privacy_callback.accountant.history == [(SIGMA, Q, 3)]
    assert second.get_privacy_spent().epsilon <= target

    # Resuming the budget-exhausted run again is refused before any step is taken.
    third = _trainer(tmp_path, target)
    with pytest.raises(BudgetExhaustedError, match="spent"):
        third.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
