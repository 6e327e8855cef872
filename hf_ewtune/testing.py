"""Tiny, fully offline models and tokenizers for tests, examples' ``--smoke`` mode and docs.

Nothing here touches the Hugging Face Hub: tokenizers are trained in code and models are built
from a config with random weights.

Example:
    >>> from hf_ewtune.testing import tiny_bert, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_bert(vocab_size=len(tok), num_labels=2)
    >>> model.config.hidden_size
    32
"""

from __future__ import annotations

from typing import Iterable, Sequence

SAMPLE_TEXTS: tuple[str, ...] = (
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "one of the best movies of the year",
    "a tedious, overlong mess",
    "warm, funny and wise",
    "dull characters and a lifeless script",
    "an absolute delight from start to finish",
    "i wanted my two hours back",
)
SAMPLE_LABELS: tuple[int, ...] = (1, 0, 1, 0, 1, 0, 1, 0)


def tiny_tokenizer(texts: Iterable[str] = SAMPLE_TEXTS, *, vocab_size: int = 200, kind: str = "wordpiece"):
    """Train a small tokenizer in code and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: Training corpus.
        vocab_size: Target vocabulary size.
        kind: ``"wordpiece"`` (BERT-like, with [CLS]/[SEP]/[PAD]) or ``"bpe"`` (GPT-2-like byte-level BPE).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "wordpiece":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            texts,
            trainers.BpeTrainer(
                vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        )
    raise ValueError(f"kind must be 'wordpiece' or 'bpe', got {kind!r}")


def tiny_bert(*, vocab_size: int = 200, num_labels: int = 2, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A randomly initialised 2-layer BERT sequence classifier (eager attention, dropout off)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(*, vocab_size: int = 200, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, num_labels: int | None = None):
    """A randomly initialised 2-layer GPT-2 LM (tied embeddings) or, with ``num_labels``, a classifier."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    if num_labels is not None:
        config.num_labels = num_labels
        return GPT2ForSequenceClassification(config)
    return GPT2LMHeadModel(config)


def tiny_classification_dataset(tokenizer, *, n: int = 64, max_length: int = 16,
                                texts: Sequence[str] = SAMPLE_TEXTS, labels: Sequence[int] = SAMPLE_LABELS, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` tokenized (padded to ``max_length``) labelled sentences."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    idx = [rng.randrange(len(texts)) for _ in range(n)]
    enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [labels[i] for i in idx]})
