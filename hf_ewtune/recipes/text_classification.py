"""The main job: (DP) LoRA fine-tuning of a sequence classifier, evaluation, model + card + privacy plot.

Defaults reproduce ``hf-ewtune train``: all-MiniLM-L6-v2 with LoRA (r=8, alpha 16, query/value of the top 2
layers) and a linear classifier on its mean-pooled, L2-normalised sentence vector (the pooling the
sentence-transformers checkpoint declares; see :mod:`hf_ewtune.recipes.pooling`), trained fully at its own
learning rate, 2 epochs on the offline Rotten Tomatoes data, target certified epsilon 3.

Example:
    >>> from hf_ewtune.recipes import TextClassificationConfig, run_text_classification
    >>> result = run_text_classification(config=TextClassificationConfig(output_dir="runs/x", smoke=True))  # doctest: +SKIP
    >>> print("\\n".join(result.summary_lines()))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hf_ewtune.cli_options import positive_float, positive_int
from hf_ewtune.data import hub_id
from hf_ewtune.recipes.metrics import accuracy_metrics
from hf_ewtune.recipes.heads import HEAD_CHOICES, add_load_section, head_optimizer, load_classifier, write_head_settings
from hf_ewtune.recipes.models import LoraSettings, apply_lora, to_training_device
from hf_ewtune.recipes.training import PrivacySettings, RunResult, build_trainer, privacy_outputs, training_arguments

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DATASET = "rotten_tomatoes_offline"


@dataclass
class TextClassificationConfig:
    """Settings of the text-classification recipe (defaults = the README's main job, about 10 min on 2 CPU cores).

    Attributes:
        output_dir: Where the adapter, tokenizer, card, plot and ``results.json`` go.
        model: Offline name, local folder or Hub id.
        dataset: ``"rotten_tomatoes_offline"``, ``"glue/sst2"`` or a Hub id (see ``hf_ewtune.data``).
        text_column / text_pair_column / label_column: Column names (pair column for sentence-pair tasks).
        max_length: Truncation length in tokens (batches are padded dynamically).
        epochs: Passes over the training data (an optimizer step is one expected logical batch).
        batch_size: Expected logical batch size B (Poisson rate q = B/N).
        micro_batch_size: Physical batch size; gradient accumulation = ``batch_size // micro_batch_size``.
        learning_rate: AdamW learning rate (constant schedule).
        head_learning_rate: AdamW learning rate of the classification head. ``None``: 5e-2 for a pooled head
            (a zero-initialised linear layer on a unit-norm sentence vector, which needs big steps to move
            in 45 noisy ones), ``learning_rate`` for the model's own head.
        pooling: ``"auto"`` (the pooling a sentence-transformers checkpoint declares, else the model's own
            head), ``"model"`` (``AutoModelForSequenceClassification``), ``"mean"`` or ``"cls"`` (a
            :class:`~hf_ewtune.recipes.pooling.PooledSequenceClassifier` head).
        lora: LoRA settings; ``use_lora=False`` fine-tunes every weight.
        privacy: DP settings (``privacy.private=False`` is the non-private baseline).
        max_train_samples / max_eval_samples: Subsample for quick runs.
        smoke: Tiny offline model and data, a few seconds (tests).
        seed: Seed for initialisation and the data split (the DP noise is seeded from the OS).
        save_steps: Checkpoint every that many optimizer steps (with the privacy spent so far).
        resume: Continue from the last checkpoint in ``output_dir`` (its spent privacy included).
        push_to_hub: Hub repo id to upload the finished run to (model, tokenizer, card, plot; see
            :func:`hf_ewtune.recipes.hub.publish_run`).
    """

    output_dir: str = field(default="runs/minilm-rt", metadata={"help": "output folder"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "model: an offline name (all-MiniLM-L6-v2), a local folder or a Hub id"})
    dataset: str = field(default=DEFAULT_DATASET, metadata={
        "help": "dataset: rotten_tomatoes_offline, glue/sst2 or a Hub id with text/label columns"})
    text_column: str = field(default="text", metadata={"help": "text column"})
    text_pair_column: str | None = field(default=None, metadata={"help": "second text column for sentence-pair tasks"})
    label_column: str = field(default="label", metadata={"help": "label column"})
    max_length: int = field(default=64, metadata={"help": "truncation length in tokens", "cli": {"type": positive_int}})
    epochs: float = field(default=2.0, metadata={"help": "training epochs", "cli": {"type": positive_float}})
    batch_size: int = field(default=256, metadata={
        "help": "expected logical batch size (--smoke: 32 unless set)", "cli": {"type": positive_int}})
    micro_batch_size: int = field(default=32, metadata={
        "help": "physical batch size; gradient accumulation = batch-size / micro-batch-size", "cli": {"type": positive_int}})
    learning_rate: float = field(default=1e-2, metadata={
        "help": "AdamW learning rate (default: 1e-2 LoRA, 5e-5 full)", "cli": {"type": positive_float, "default": None}})
    head_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of the classification head (default: 5e-2 for a pooled head, else --learning-rate)",
        "cli": {"type": positive_float}})
    pooling: str = field(default="auto", metadata={
        "help": "classifier head: auto = the pooling a sentence-transformers checkpoint declares (mean for "
                "all-MiniLM-L6-v2), else the model's own head", "cli": {"choices": HEAD_CHOICES}})
    use_lora: bool = field(default=True, metadata={
        "help": "fine-tune every weight instead of LoRA adapters", "cli": {"negate": "no-lora"}})
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(last_layers=2), metadata={"cli": {"skip": True}})
    privacy: PrivacySettings = field(default_factory=PrivacySettings, metadata={"cli": {"skip": True}})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "subsample the training set", "cli": {"type": positive_int}})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "subsample the test set", "cli": {"type": positive_int}})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps (default: from --epochs)", "cli": {"type": positive_int}})
    smoke: bool = field(default=False, metadata={"help": "tiny offline model and data, a few seconds (tests)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data split (the DP noise uses OS entropy)"})
    progress: bool = field(default=True, metadata={"help": "hide the progress bar", "cli": {"negate": "no-progress"}})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "upload the finished run (model, tokenizer, privacy card, plot) to this Hub repo",
        "cli": {"metavar": "REPO_ID"}})
    save_steps: int | None = field(default=None, metadata={
        "help": "write a checkpoint (with the privacy spent so far) every N optimizer steps", "cli": {"type": positive_int}})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in --output-dir; its spent privacy counts"})


def _smoke_parts(config: TextClassificationConfig, dataset: Any) -> tuple[Any, Any, Any]:
    from datasets import ClassLabel, Dataset, DatasetDict

    from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS, tiny_bert, tiny_tokenizer

    if dataset is None:
        texts = list(SAMPLE_TEXTS) * 16
        labels = list(SAMPLE_LABELS) * 16
        full = Dataset.from_dict({"text": texts, "label": labels}).shuffle(seed=config.seed)
        dataset = DatasetDict({"train": full.select(range(96)), "test": full.select(range(96, 128))})
    corpus = list(dataset["train"][config.text_column])
    if config.text_pair_column:
        corpus += list(dataset["train"][config.text_pair_column])
    tokenizer = tiny_tokenizer(corpus)
    feature = dataset["train"].features.get(config.label_column)
    num_labels = feature.num_classes if isinstance(feature, ClassLabel) else len(set(dataset["train"][config.label_column]))
    model = tiny_bert(vocab_size=len(tokenizer), num_labels=num_labels, seed=config.seed)
    if config.pooling in ("mean", "cls"):
        from hf_ewtune.recipes.pooling import PooledSequenceClassifier

        model = PooledSequenceClassifier(encoder=model.bert, num_labels=num_labels, pooling=config.pooling, normalize=True)
    return model, tokenizer, dataset


def _num_labels(dataset: Any, label_column: str) -> int:
    from datasets import ClassLabel

    feature = dataset["train"].features.get(label_column)
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(dataset["train"][label_column])) + 1


def tokenize_dataset(dataset: Any, *, tokenizer: Any, config: TextClassificationConfig) -> Any:
    """Tokenize a ``DatasetDict`` into ``input_ids``/``attention_mask``/``labels`` (no padding: the collator pads)."""
    cols = [config.text_column] + ([config.text_pair_column] if config.text_pair_column else [])
    for split, ds in dataset.items():
        missing = [c for c in cols + [config.label_column] if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"Split {split!r} has no column(s) {missing} (columns: {ds.column_names}): set "
                "text_column / text_pair_column / label_column."
            )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[config.text_pair_column] if config.text_pair_column else None
        enc = tokenizer(batch[config.text_column], pair, truncation=True, max_length=config.max_length)
        enc["labels"] = batch[config.label_column]
        return enc

    out = {}
    for split, ds in dataset.items():
        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
    from datasets import DatasetDict

    return DatasetDict(out)


def run_text_classification(
    *,
    config: TextClassificationConfig,
    dataset: Any = None,
    model: Any = None,
    tokenizer: Any = None,
    compute_metrics: Callable | None = None,
) -> RunResult:
    """Fine-tune, evaluate, and save model, tokenizer, privacy card, privacy-curve plot and ``results.json``.

    Args:
        config: Recipe settings.
        dataset: A ``DatasetDict`` with ``train`` and ``test`` splits (loaded from ``config.dataset`` if omitted).
        model: A ready sequence-classification model (loaded from ``config.model`` if omitted).
        tokenizer: Its tokenizer (required when ``model`` is given).
        compute_metrics: ``Trainer`` metric function (offline accuracy by default).

    Returns:
        A :class:`RunResult`; the test metrics are prefixed ``eval_`` stripped (``accuracy``).
    """
    from transformers import DataCollatorWithPadding, set_seed

    start = time.perf_counter()
    set_seed(config.seed)
    if (model is None) != (tokenizer is None):
        raise ValueError("Pass both model= and tokenizer=, or neither.")
    gguf = False
    if config.smoke and model is None:
        model, tokenizer, dataset = _smoke_parts(config, dataset)
    if dataset is None:
        from hf_ewtune.data import load_text_classification

        dataset = load_text_classification(config.dataset, seed=config.seed)
    if "test" not in dataset:
        raise ValueError(f"The dataset needs a 'test' split, it has {list(dataset)}.")
    if config.max_train_samples:
        dataset["train"] = dataset["train"].shuffle(seed=config.seed).select(range(min(config.max_train_samples, dataset["train"].num_rows)))
    if config.max_eval_samples:
        dataset["test"] = dataset["test"].select(range(min(config.max_eval_samples, dataset["test"].num_rows)))
    if model is None:
        model, tokenizer, gguf = load_classifier(config.model, num_labels=_num_labels(dataset, config.label_column),
                                                 pooling=config.pooling)
    args = training_arguments(
        output_dir=config.output_dir, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
        epochs=config.epochs, learning_rate=config.learning_rate, seed=config.seed, max_steps=config.max_steps,
        save_steps=config.save_steps,
        progress=config.progress, logging_steps=0.5 if config.smoke else 0.1,
    )
    model = to_training_device(model, args)  # device first (this process's GPU), then PEFT (dp-training.md §10)
    if config.use_lora:
        model = apply_lora(model, settings=config.lora, task_type="SEQ_CLS")
    encoded = tokenize_dataset(dataset, tokenizer=tokenizer, config=config)
    trainer = build_trainer(
        model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["test"], tokenizer=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics or accuracy_metrics,
        privacy=config.privacy, optimizer=head_optimizer(model, learning_rate=config.learning_rate,
                                                       head_learning_rate=config.head_learning_rate),
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if config.resume else None)
    train_seconds = time.perf_counter() - t0
    raw = trainer.evaluate(encoded["test"])
    metrics = {k[len("eval_"):]: float(v) for k, v in raw.items()
               if k.startswith("eval_") and k[len("eval_"):] not in ("loss", "runtime", "samples_per_second", "steps_per_second", "epsilon", "epsilon_edgeworth")}
    out = Path(config.output_dir)
    from hf_ewtune.recipes.models import save_model

    save_model(trainer=trainer, output_dir=out, gguf=gguf)
    main = trainer.is_world_process_zero()  # under accelerate launch, only rank 0 writes the run's files
    if main:
        write_head_settings(model, base_model=None if config.smoke else config.model, output_dir=out)
    fields, plot_path = privacy_outputs(trainer=trainer, privacy=config.privacy, output_dir=out, write=main)
    card_path = _write_card(trainer=trainer, config=config, metrics=metrics) if main else None
    result = RunResult(
        output_dir=str(out), metrics=metrics, wall_seconds=time.perf_counter() - start, train_seconds=train_seconds,
        steps=int(trainer.state.global_step), private=config.privacy.private, plot_path=str(plot_path) if plot_path else None,
        card_path=str(card_path) if card_path else None, settings=asdict(config), **fields,
    )
    result.main_process = main
    if main:
        result.write_json()
        if config.push_to_hub:
            from hf_ewtune.recipes.hub import publish_run

            try:
                result.hub_commit = publish_run(out, repo_id=config.push_to_hub)
            except Exception as exc:  # the finished run stays on disk; publishing can be retried
                logger.error("Publishing to %s failed (%s). The run is saved in %s; retry with "
                             "hf_ewtune.recipes.hub.publish_run(%r, repo_id=%r).", config.push_to_hub, exc, out,
                             str(out), config.push_to_hub)
            else:
                result.write_json()
    trainer.accelerator.wait_for_everyone()  # ranks leave together, after rank 0 has written the run
    return result


def _write_card(*, trainer: Any, config: TextClassificationConfig, metrics: dict[str, float]) -> Path | None:
    """Write ``README.md`` via ``trainer.create_model_card`` (the DP trainer adds the privacy block)."""
    card = Path(config.output_dir) / "README.md"
    try:
        trainer.create_model_card(
            model_name=Path(config.output_dir).name,
            finetuned_from=None if config.smoke else hub_id(config.model),
            dataset=None if config.smoke else config.dataset,
            tasks="text-classification",
        )
    except Exception as exc:  # the card must not lose a finished training run
        logger.warning("create_model_card failed (%s): the model is saved without a card.", exc)
        return None
    if not card.exists():
        return None
    add_load_section(card, Path(config.output_dir))
    return card

