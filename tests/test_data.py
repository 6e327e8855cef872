import os

import pytest

from hf_ewtune import data


def test_rotten_tomatoes_offline_split():
    ds = data.load_rotten_tomatoes()
    assert set(ds) == {"train", "test"}
    n_train, n_test = ds["train"].num_rows, ds["test"].num_rows
    assert 12_000 < n_train + n_test < 13_500
    assert abs(n_test / (n_train + n_test) - 0.1) < 0.01
    assert set(ds["train"]["label"]) == {0, 1}
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])  # de-duplicated, disjoint
    assert all("\n" not in t for t in ds["test"]["text"][:200])


def test_split_is_seeded():
    a, b = data.load_rotten_tomatoes(seed=1), data.load_rotten_tomatoes(seed=1)
    assert a["test"]["text"][:20] == b["test"]["text"][:20]
    assert data.load_rotten_tomatoes(seed=2)["test"]["text"][:20] != a["test"]["text"][:20]


def test_offline_model_locators():
    assert os.path.exists(os.path.join(data.minilm_path(), "model.safetensors"))
    folder, gguf = data.smollm2_gguf()
    assert gguf.endswith(".gguf") and os.path.exists(os.path.join(folder, gguf))
    assert data.resolve_model("all-MiniLM-L6-v2")[0] == data.minilm_path()


def test_bad_fraction_is_rejected():
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_rotten_tomatoes(test_fraction=1.5)
