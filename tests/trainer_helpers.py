"""Shared set-up for the DPTrainer tests: a tiny tokenizer, short TrainingArguments, tiny data."""

from transformers import TrainingArguments

from hf_ewtune.testing import tiny_classification_dataset, tiny_tokenizer

TOK = tiny_tokenizer()


def _args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=8,
        save_strategy="no", logging_steps=50, disable_tqdm=True,  # epsilon logged once, at the end
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _data(n=32, **kw):
    return tiny_classification_dataset(TOK, n=n, **kw)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
