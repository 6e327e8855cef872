"""``hf-ewtune sft``: DP SFT with LoRA from the command line (the recipe behind examples/sft.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from hf_ewtune.cli import build_parser, main  # noqa: E402


def test_sft_is_a_subcommand_with_the_recipe_options():
    args = build_parser().parse_args(["sft", "--smoke", "--dataset", "owner/chat", "--user-id-column", "author",
                                      "--non-private", "--no-lora", "--lora-r", "4"])
    assert args.command == "sft" and args.smoke and args.dataset == "owner/chat"
    assert args.user_id_column == "author" and args.private is False and args.use_lora is False and args.lora_r == 4
    assert build_parser().parse_args(["sft"]).target_epsilon == 8.0  # the recipe's default budget


def test_sft_smoke_runs_from_the_cli_and_writes_a_private_card(tmp_path, capsys):
    assert main(["sft", "--smoke", "--output-dir", str(tmp_path), "--max-steps", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["private"] is True and 0 < results["epsilon"] and results["steps"] == 2
    assert 0.0 <= results["accuracy"] <= 1.0 and results["lora"] is True
    card = (tmp_path / "README.md").read_text()
    assert "privacy:" in card and "one training example" in card
    out = capsys.readouterr().out
    assert "hf-ewtune sft: tiny offline Llama (smoke)" in out and "generation accuracy" in out


def test_sft_dataset_by_name_trains_user_level_and_scores_the_held_out_loss(tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    loaded = []

    def fake_load_dataset(name, split):  # what a Hub chat dataset looks like (no network in tests)
        loaded.append((name, split))
        n = 30
        return Dataset.from_dict({
            "messages": [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
                         for w in (["yes", "no", "maybe"] * n)[:n]],
            "author": [f"user{i % 6}" for i in range(n)], "source": ["x"] * n})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    argv = ["sft", "--smoke", "--dataset", "owner/chat", "--user-id-column", "author", "--output-dir", str(tmp_path),
            "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2", "--max-eval-samples", "4"]
    assert main(argv) == 0
    assert loaded == [("owner/chat", "train")]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["privacy_unit"] == "user" and results["num_users"] == 6 and results["test_records"] == 4
    assert results["eval_loss"] > 0 and results["dataset"] == "owner/chat"
    assert "held-out loss" in capsys.readouterr().out


def test_sft_bad_dataset_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from datasets import Dataset

    monkeypatch.setattr("datasets.load_dataset", lambda name, split: Dataset.from_dict({"text": ["a", "b"]}))
    assert main(["sft", "--smoke", "--dataset", "owner/plain", "--output-dir", str(tmp_path)]) == 2
    assert "needs a 'messages' column" in capsys.readouterr().err
