"""The shipped example card (model_cards/example, from model_cards/make_example.py) names its base model and data
and has no empty field."""

from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "model_cards" / "example" / "README.md"
BASE = "sentence-transformers/all-MiniLM-L6-v2"


def _split(text: str) -> tuple[dict, str]:
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def _empty_fields(value, path="") -> list[str]:
    if value is None or (isinstance(value, (str, list, dict)) and len(value) == 0):
        return [path or "<root>"]
    if isinstance(value, str) and value.rstrip().endswith(":"):  # e.g. the tag 'base_model:adapter:'
        return [path]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _empty_fields(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _empty_fields(v, f"{path}[{i}]")]
    return []


def test_example_card_names_a_real_base_model():
    meta, body = _split(EXAMPLE.read_text(encoding="utf-8"))
    assert meta["base_model"] == BASE  # old main: ''
    assert f"base_model:adapter:{BASE}" in meta["tags"]
    assert f"[{BASE}](https://huggingface.co/{BASE})" in body
    assert meta["privacy"]["target_epsilon"] == 3.0 and meta["privacy"]["epsilon"] <= 3.0


def test_example_card_has_no_empty_field():
    meta, body = _split(EXAMPLE.read_text(encoding="utf-8"))
    assert _empty_fields(meta) == []
    for placeholder in ("[](", "None dataset", "More information needed"):
        assert placeholder not in body
    results = body.split("### Training results", 1)[1].split("###", 1)[0]
    assert "accuracy" in results
