"""``hf-ewtune audit`` on the main job's model and data: the same loading, LoRA and optimizer as ``train``.

The audited run differs from ``hf-ewtune train`` only by the canaries: gradient canaries add one
canary weight (``nn.Linear(m, 1)``, its own AdamW group at ``learning_rate``) and about ``m/2`` rows; input
canaries are mislabelled rows of the test split (never of the training split), about ``m/2`` of them added to
the training data. Nothing is saved but the report (``audit_report.json``).
"""

from __future__ import annotations

import time
from typing import Any

from hf_ewtune.arguments import PrivacyArguments
from hf_ewtune.audit.canaries import GradientCanaryModel
from hf_ewtune.audit.report import AuditReport
from hf_ewtune.audit.run import run_audit
from hf_ewtune.errors import PrivacyConfigError


def audit_text_classification(
    *, config: Any, kind: str = "gradient", num_canaries: int = 1000, confidence: float = 0.95,
    gradient_multiple: float = 10.0, command: str | None = None,
) -> AuditReport:
    """Audit the main job's (or ``config``'s) DP training with one canaried run.

    Args:
        config: A :class:`~hf_ewtune.recipes.TextClassificationConfig` (as ``hf-ewtune train`` builds it).
        kind: ``"gradient"`` or ``"input"``.
        num_canaries: m.
        confidence: Confidence of the lower bound.
        gradient_multiple: Gradient canaries' gradient norm in units of C.
        command: The command line, for the report.

    Raises:
        PrivacyConfigError: a non-private config, or anything the audit or ``DPTrainer`` rejects.
    """
    from transformers import DataCollatorWithPadding, set_seed

    from hf_ewtune.recipes.heads import head_optimizer, load_classifier
    from hf_ewtune.recipes.models import apply_lora, to_training_device
    from hf_ewtune.recipes.text_classification import _num_labels, _smoke_parts, tokenize_dataset
    from hf_ewtune.recipes.training import training_arguments

    if not config.privacy.private:
        raise PrivacyConfigError("there is nothing to audit in a non-private run; drop --non-private.")
    set_seed(config.seed)
    dataset = None
    if config.smoke:
        model, tokenizer, dataset = _smoke_parts(config, None)
    else:
        from hf_ewtune.data import load_text_classification

        dataset = load_text_classification(config.dataset, seed=config.seed)
        model = None
    if config.max_train_samples:
        dataset["train"] = dataset["train"].shuffle(seed=config.seed).select(
            range(min(config.max_train_samples, dataset["train"].num_rows)))
    num_labels = _num_labels(dataset, config.label_column)
    if model is None:
        model, tokenizer, _ = load_classifier(config.model, num_labels=num_labels, pooling=config.pooling)
    args = training_arguments(
        output_dir=config.output_dir, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
        epochs=config.epochs, learning_rate=config.learning_rate, seed=config.seed, max_steps=config.max_steps,
        progress=config.progress, logging_steps=0.5,
    )
    model = to_training_device(model, args)  # cuda:LOCAL_RANK per process, not "cuda" (GPU 0); then PEFT
    if config.use_lora:
        model = apply_lora(model, settings=config.lora, task_type="SEQ_CLS")
    encoded = tokenize_dataset(dataset, tokenizer=tokenizer, config=config)

    def optimizer_factory(trained: Any) -> Any:
        inner = trained.model if isinstance(trained, GradientCanaryModel) else trained
        optimizer = head_optimizer(inner, learning_rate=config.learning_rate, head_learning_rate=config.head_learning_rate)
        if optimizer is not None and isinstance(trained, GradientCanaryModel):
            optimizer.add_param_group({"params": [trained.canary.weight], "lr": config.learning_rate})
        return optimizer

    pa = config.privacy
    privacy = PrivacyArguments(
        target_epsilon=pa.target_epsilon if pa.noise_multiplier is None else None, noise_multiplier=pa.noise_multiplier,
        target_delta=pa.target_delta, max_grad_norm=pa.max_grad_norm, accountant=pa.accountant,
    )
    start = time.perf_counter()
    report = run_audit(
        model=model, args=args, train_dataset=encoded["train"], kind=kind, num_canaries=num_canaries,
        canary_pool=encoded["test"] if kind == "input" else None, num_labels=num_labels,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        optimizer_factory=optimizer_factory, confidence=confidence, gradient_multiple=gradient_multiple,
        seed=config.seed, privacy_args=privacy, command=command,
    )
    report.wall_seconds = time.perf_counter() - start
    return report
