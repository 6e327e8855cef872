"""``hf-ewtune train`` options are generated from the recipe dataclasses, with PrivacyArguments' checks."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hf_ewtune.commands import train
from hf_ewtune.recipes import LoraSettings, PrivacySettings, TextClassificationConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser


def test_every_dataclass_field_has_a_flag_and_a_help():
    dests = {a.dest: a for a in _parser()._actions}
    for cls, prefix in ((TextClassificationConfig, ""), (PrivacySettings, ""), (LoraSettings, "lora_")):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", {}).get("skip"):
                continue
            assert prefix + f.name in dests, (cls.__name__, f.name)
            assert dests[prefix + f.name].help, (cls.__name__, f.name)


def test_defaults_round_trip_to_the_recipe_defaults():
    config = train.config_from_args(_parser().parse_args([]))
    assert config == TextClassificationConfig()


def test_flags_reach_the_config():
    config = train.config_from_args(_parser().parse_args([
        "--no-lora", "--lora-target", "query,value", "--lora-last-layers", "0", "--non-private", "--max-grad-norm",
        "0.5", "--target-delta", "1e-6", "--accountant", "pld", "--max-steps", "3",
    ]))
    assert config.use_lora is False and config.learning_rate == 5e-5
    assert config.lora.target_modules == ["query", "value"] and config.lora.last_layers is None
    p = config.privacy
    assert (p.private, p.max_grad_norm, p.target_delta, p.accountant) == (False, 0.5, 1e-6, "pld")
    assert config.max_steps == 3


@pytest.mark.parametrize("flags, message", [
    (["--target-delta", "2"], "target_delta must be in (0, 1)"),  # the old hand-written list accepted any delta > 0
    (["--noise-multiplier", "-1"], "noise_multiplier"),  # ... and any noise multiplier
    (["--max-grad-norm", "0"], "max_grad_norm"),
])
def test_privacy_values_are_checked_while_parsing_by_the_privacy_arguments_checks(flags, message, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(flags)
    assert message in capsys.readouterr().err
