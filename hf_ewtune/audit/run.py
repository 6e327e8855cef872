"""One audited training run with :class:`~hf_ewtune.DPTrainer`, used exactly as a user would.

:func:`run_audit` copies the model, draws each canary's inclusion (probability 1/2), builds the training
set, trains once with ``DPTrainer`` (or ``trainer_class``), scores every canary, and returns an
:class:`~hf_ewtune.audit.AuditReport` with the certified epsilon and the one-run lower bound. The audited
copy is discarded: nothing trained with canaries is saved (checkpointing is turned off, pushing refused).
Under ``accelerate launch`` every rank runs it: the canaries are drawn once for all ranks and every replica's
canary scores are gathered, so noise that reaches only some replicas is caught (:mod:`~hf_ewtune.audit.processes`).

Example:
    >>> from transformers import TrainingArguments
    >>> from hf_ewtune.audit import run_audit
    >>> from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> args = TrainingArguments(output_dir="/tmp/audit-doc", use_cpu=True, report_to="none", max_steps=3,
    ...                          per_device_train_batch_size=16, disable_tqdm=True, logging_strategy="no")
    >>> report = run_audit(model=tiny_bert(vocab_size=len(tok)), args=args,
    ...                    train_dataset=tiny_classification_dataset(tok, n=32), num_canaries=64,
    ...                    noise_multiplier=1.0, max_grad_norm=1.0, seed=0)  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> report.epsilon_lower <= report.certified_epsilon
    True
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shlex
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

from hf_ewtune.arguments import PrivacyArguments
from hf_ewtune.audit.canaries import (
    GradientCanaryModel,
    add_gradient_canaries,
    canary_gradient_recorder,
    draw_inclusion,
    input_canary_scores,
    make_input_canaries,
)
from hf_ewtune.audit.guesses import GuessResult, audit_scores
from hf_ewtune.audit.processes import gather_scores, replicas_agree, shared_seed
from hf_ewtune.audit.report import AuditReport
from hf_ewtune.errors import PrivacyConfigError

logger = logging.getLogger(__name__)

KINDS = ("gradient", "input")


class PrivacyViolationWarning(UserWarning):
    """The audited lower bound on epsilon exceeds the certified epsilon: the guarantee is false."""


def run_audit(
    *,
    model: Any,
    args: Any,
    train_dataset: Any,
    kind: str = "gradient",
    num_canaries: int = 1000,
    canary_pool: Any = None,
    num_labels: int | None = None,
    data_collator: Any = None,
    processing_class: Any = None,
    optimizer_factory: Callable[[Any], Any] | None = None,
    confidence: float = 0.95,
    gradient_multiple: float = 10.0,
    seed: int | None = None,
    trainer_class: type | None = None,
    privacy_args: PrivacyArguments | None = None,
    command: str | None = None,
    **privacy_kwargs: Any,
) -> AuditReport:
    """Train once with canaries and bound epsilon from below (Steinke, Nasr & Jagielski 2023).

    Args:
        model: The sequence classifier to audit; it is deep-copied, the copy is trained and discarded.
        args: The ``TrainingArguments`` of the run (``save_strategy`` is forced to ``"no"``).
        train_dataset: The training data (a tokenized ``datasets.Dataset`` with ``labels``).
        kind: ``"gradient"`` (white-box Dirac gradient canaries) or ``"input"`` (mislabelled examples from
            ``canary_pool``, scored by loss).
        num_canaries: m (>= 2); each is included with probability 1/2.
        canary_pool: For ``kind="input"``: tokenized examples NOT in ``train_dataset`` to make canaries from.
        num_labels: For ``kind="input"``: number of classes (default: ``model.config.num_labels``).
        data_collator: Passed to the trainer (and used to score input canaries).
        processing_class: Passed to the trainer (e.g. the tokenizer).
        optimizer_factory: ``f(trained_model) -> torch optimizer or None`` (``None``: the Trainer's AdamW).
            It receives what is trained: the copy, or its :class:`GradientCanaryModel` wrapper.
        confidence: Confidence of the lower bound, in (0, 1).
        gradient_multiple: Gradient canaries' gradient norm in units of the clipping norm C (>= 1).
        seed: Seed of the canary coins and choices (``None``: OS entropy, drawn on rank 0 and shared by every
            rank of a multi-process run). The DP noise is seeded as usual.
        trainer_class: The trainer to audit (default :class:`~hf_ewtune.DPTrainer`).
        privacy_args: The privacy settings, or pass :class:`~hf_ewtune.PrivacyArguments` fields as keywords.
        command: The command line to record in the report.
        **privacy_kwargs: :class:`~hf_ewtune.PrivacyArguments` fields (``target_epsilon=``, ...).

    Returns:
        The :class:`~hf_ewtune.audit.AuditReport`. A lower bound above the certified epsilon also logs an
        error and warns with :class:`PrivacyViolationWarning`.

    Raises:
        PrivacyConfigError: bad ``kind``, ``num_canaries``, ``confidence``, a missing ``canary_pool``,
            ``args.push_to_hub``, or anything ``DPTrainer`` rejects (all before training).
    """
    from datasets import concatenate_datasets
    from transformers.trainer_utils import SaveStrategy

    if kind not in KINDS:
        raise PrivacyConfigError(f"kind must be one of {KINDS}, got {kind!r}.")
    if not 0.0 < confidence < 1.0:
        raise PrivacyConfigError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}.")
    if getattr(args, "push_to_hub", False):
        raise PrivacyConfigError("args.push_to_hub=True: an audit model carries canaries and is never published; "
                                 "set push_to_hub=False.")
    if privacy_args is not None and privacy_kwargs:
        raise PrivacyConfigError("pass the privacy settings either as privacy_args= or as keyword arguments, not both.")
    pa = privacy_args if privacy_args is not None else PrivacyArguments(**privacy_kwargs)
    seed = shared_seed(seed)  # multi-process: every rank must draw the same canaries
    included = draw_inclusion(num_canaries=num_canaries, seed=seed)
    model = copy.deepcopy(model)
    args.save_strategy = SaveStrategy.NO  # nothing trained with canaries reaches the disk

    if kind == "gradient":
        trained = GradientCanaryModel(model=model, num_canaries=num_canaries, max_grad_norm=pa.max_grad_norm,
                                      gradient_multiple=gradient_multiple)
        data = add_gradient_canaries(train_dataset=train_dataset, included=included)
        canaries = None
    else:
        if canary_pool is None:
            raise PrivacyConfigError("kind='input' needs canary_pool= (tokenized examples outside train_dataset).")
        labels = num_labels if num_labels is not None else getattr(getattr(model, "config", None), "num_labels", None)
        if labels is None:
            raise PrivacyConfigError("kind='input' needs num_labels= (the model has no config.num_labels).")
        canaries = make_input_canaries(pool=canary_pool, num_canaries=num_canaries, num_labels=int(labels), seed=seed)
        trained = model
        data = concatenate_datasets([train_dataset, canaries.select(np.flatnonzero(included).tolist())])

    from hf_ewtune import DPTrainer

    cls = trainer_class or DPTrainer
    kwargs: dict[str, Any] = dict(model=trained, args=args, train_dataset=data, privacy_args=pa,
                                  per_example_loss_task="classification")
    if data_collator is not None:
        kwargs["data_collator"] = data_collator
    if processing_class is not None:
        kwargs["processing_class"] = processing_class
    optimizer = optimizer_factory(trained) if optimizer_factory is not None else None
    if optimizer is not None:
        kwargs["optimizers"] = (optimizer, None)
    trainer = cls(**kwargs)
    if kind == "gradient":
        trainer.add_callback(canary_gradient_recorder(model=trained))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    if kind == "gradient":
        scores = trained.canary_scores()
    else:
        scores = input_canary_scores(model=trained, canaries=canaries, collator=trainer.data_collator)
    spent = trainer.get_privacy_spent()
    rank_scores = gather_scores(scores)  # every replica's scores (multi-process); [scores] in one process
    agree = replicas_agree(rank_scores)
    guess = _audit_replicas(rank_scores[:1] if agree else rank_scores, included=included, delta=trainer.delta,
                            confidence=confidence)
    report = AuditReport(
        kind=kind, certified_epsilon=float(spent.epsilon), delta=float(trainer.delta), epsilon_lower=guess.epsilon_lower,
        confidence=confidence, num_canaries=num_canaries, num_included=int(included.sum()),
        num_guesses=guess.num_guesses, num_correct=guess.num_correct, steps=int(trainer.state.global_step),
        noise_multiplier=float(trainer.noise_multiplier), sample_rate=float(trainer.sample_rate),
        train_seconds=seconds, rules_tried=guess.rules_tried,
        command=command, num_processes=len(rank_scores), replicas_agree=agree,
    )
    engine = getattr(trainer, "_engine", None)
    if engine is not None:  # drop the clipping hooks from the discarded copy
        engine.remove()
    if not agree:
        logger.error(report.divergence_line())
    if report.violation:
        message = report.summary_lines()[0]
        logger.error(message)
        warnings.warn(message, PrivacyViolationWarning, stacklevel=2)
    return report


def _audit_replicas(rank_scores: list[np.ndarray], *, included: np.ndarray, delta: float,
                    confidence: float) -> GuessResult:
    """The best bound over the replicas' scores, Bonferroni over them (one replica: the plain audit)."""
    per_replica = 1.0 - (1.0 - confidence) / len(rank_scores)
    results = [audit_scores(scores=s, included=included, delta=delta, confidence=per_replica) for s in rank_scores]
    best = max(results, key=lambda r: r.epsilon_lower)
    return dataclasses.replace(best, confidence=confidence)


def command_line() -> str:
    """The current process's command line, quoted (for the report)."""
    return " ".join(shlex.quote(a) for a in ["hf-ewtune", *sys.argv[1:]])
