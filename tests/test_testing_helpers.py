from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_gpt2, tiny_tokenizer


def test_tiny_models_build_offline():
    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tok))
    ds = tiny_classification_dataset(tok, n=8)
    assert len(ds) == 8 and set(ds.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert model.config.num_labels == 2
    gpt = tiny_gpt2(vocab_size=len(tiny_tokenizer(kind="bpe")))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


def test_tiny_tokenizer_is_deterministic():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "a gripping film with unseenword"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"], skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    bpe = tiny_tokenizer(kind="bpe")
    assert bpe.decode(bpe("héllo world")["input_ids"]) == "héllo world"
    assert len(tiny_tokenizer(vocab_size=10_000)) > len(tiny_tokenizer(vocab_size=60))
