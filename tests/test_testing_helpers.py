from hf_ewtune.testing import tiny_bert, tiny_classification_dataset, tiny_gpt2, tiny_tokenizer


def test_tiny_models_build_offline():
    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=len(tok))
    ds = tiny_classification_dataset(tok, n=8)
    assert len(ds) == 8 and set(ds.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert model.config.num_labels == 2
    gpt = tiny_gpt2(vocab_size=len(tiny_tokenizer(kind="bpe")))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
