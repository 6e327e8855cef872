"""delta >= 1/N: refused before training unless allow_large_delta=True, and then stated on the model card."""

from __future__ import annotations

import pytest

from hf_ewtune import DPTrainer, PrivacyArguments
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.large_delta import LARGE_DELTA_NOTE
from hf_ewtune.model_card import read_privacy_metadata
from hf_ewtune.testing import tiny_bert
from tests.trainer_helpers import TOK, _args, _data


def _trainer(tmp_path, **privacy):
    return DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_steps=1), train_dataset=_data(n=32),
                     noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0, **privacy)


@pytest.mark.parametrize("delta", [1 / 32, 0.5])
def test_delta_at_or_above_one_over_n_is_refused_before_training(tmp_path, delta):
    with pytest.raises(PrivacyConfigError, match="target_delta=.*not below 1/N.*allow_large_delta=True"):
        _trainer(tmp_path, target_delta=delta)


def test_delta_just_below_one_over_n_is_accepted(tmp_path):
    assert _trainer(tmp_path, target_delta=0.99 / 32).delta == pytest.approx(0.99 / 32)


def test_opted_in_large_delta_is_stated_on_the_card(tmp_path):
    trainer = _trainer(tmp_path, target_delta=0.5, allow_large_delta=True)
    assert trainer.privacy_state()["allow_large_delta"] is True
    trainer.train()
    trainer.create_model_card(model_name="tiny-dp")
    meta = read_privacy_metadata(tmp_path)
    assert meta["delta"] == 0.5 and meta["large_delta_allowed"] is True and meta["delta_note"] == LARGE_DELTA_NOTE
    assert "releasing whole training rows" in meta["delta_note"] and "probability delta" in meta["delta_note"]
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "**Caveat (δ):**" in card and "δN ≥ 1 rows in expectation" in card


def test_card_of_a_run_with_a_small_delta_has_no_delta_caveat(tmp_path):
    trainer = _trainer(tmp_path, target_delta=1e-5)
    trainer.train()
    trainer.create_model_card(model_name="tiny-dp")
    meta = read_privacy_metadata(tmp_path)
    assert "delta_note" not in meta and "large_delta_allowed" not in meta
    assert "Caveat (δ)" not in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_allow_large_delta_must_be_a_bool():
    with pytest.raises(PrivacyConfigError, match="allow_large_delta"):
        PrivacyArguments(noise_multiplier=1.0, allow_large_delta="yes")


def test_cli_refuses_a_large_delta_without_the_flag(tmp_path, capsys):
    from hf_ewtune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--smoke", "--no-progress", "--output-dir", str(out), "--target-delta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "target_delta=0.5 is not below 1/N" in err and "--allow-large-delta" in err
    assert not (out / "README.md").exists()  # nothing was trained or published


def test_cli_flag_reaches_the_trainer():
    import argparse

    from hf_ewtune.commands.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--target-delta", "0.5", "--allow-large-delta", "--smoke"]))
    assert config.privacy.allow_large_delta is True and config.privacy.target_delta == 0.5
    assert config_from_args(parser.parse_args(["--smoke"])).privacy.allow_large_delta is False
