"""Tiny, fully offline models and tokenizers for tests, examples' ``--smoke`` mode and docs.

Nothing here touches the Hugging Face Hub: tokenizers are trained in code and models are built
from a config with random weights.

:func:`check_per_example_gradients` is the library's oracle, for your own architectures: the clipping
engine's per-example gradients against one backward per example, in float64.

Example:
    >>> from hf_ewtune.testing import tiny_bert, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_bert(vocab_size=len(tok), num_labels=2)
    >>> model.config.hidden_size
    32
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

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


def check_per_example_gradients(model: Any, batch: Any, loss_fn: Any = None, **kwargs: Any) -> Any:
    """Check the clipping engine on ``model`` against one backward per example (float64).

    See :func:`hf_ewtune.gradient_check.check_per_example_gradients` for the arguments.

    Example:
        >>> import torch
        >>> from hf_ewtune.testing import check_per_example_gradients, tiny_bert
        >>> batch = {"input_ids": torch.randint(5, 200, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long),
        ...          "labels": torch.tensor([0, 1, 1])}
        >>> report = check_per_example_gradients(tiny_bert(), batch)
        >>> report.ok, report.max_abs_error < 1e-10
        (True, True)
    """
    from hf_ewtune.gradient_check import check_per_example_gradients as check

    return check(model, batch, loss_fn, **kwargs)


def tiny_tokenizer(texts: Iterable[str] = SAMPLE_TEXTS, *, vocab_size: int = 200, kind: str = "wordpiece"):
    """Build a small tokenizer in code, deterministically, and wrap it as a ``PreTrainedTokenizerFast``.

    The vocabulary is computed here (not by a ``tokenizers`` trainer, whose tie-breaking is not
    reproducible), so every call and every process gets identical ids.

    Args:
        texts: Corpus the vocabulary is built from.
        vocab_size: Upper bound on the WordPiece vocabulary: special tokens, every character (also as a
            ``##`` continuation), then the most frequent words (ties broken alphabetically).
        kind: ``"wordpiece"`` (BERT-like, with [CLS]/[SEP]/[PAD]) or ``"bpe"`` (GPT-2-like byte-level BPE
            over the 256-byte alphabet, no merges, plus ``<|endoftext|>``).
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "wordpiece":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer = normalizers.BertNormalizer(lowercase=True)
        pre = pre_tokenizers.BertPreTokenizer()
        words: Counter[str] = Counter()
        for text in texts:
            words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted({c for w in words for c in w})
        vocab = special + chars + ["##" + c for c in chars]
        room = max(vocab_size - len(vocab), 0)
        ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
        vocab += ranked[:room]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    if kind == "bpe":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
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
