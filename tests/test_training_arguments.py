"""DPTrainingArguments: one parser for every flag, checks while parsing, and the caller's arguments left untouched."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_ewtune import DPTrainer, DPTrainingArguments, PrivacyArguments
from hf_ewtune.errors import PrivacyConfigError

from trainer_helpers import TOK, _args, _data
from hf_ewtune.testing import tiny_bert

BASE = ["--output_dir", "unused", "--use_cpu", "--report_to", "none"]


def test_hf_argument_parser_reads_every_flag_and_max_grad_norm_is_the_per_example_norm():
    (args,) = HfArgumentParser(DPTrainingArguments).parse_args_into_dataclasses([
        *BASE, "--target_epsilon", "3", "--max_grad_norm", "0.1", "--accountant", "pld", "--learning_rate", "1e-3",
        "--poisson_sampling", "false", "--max_physical_batch_size", "4",
    ])
    assert isinstance(args, TrainingArguments)
    assert args.max_grad_norm == 0.1 and args.learning_rate == 1e-3
    pa = args.privacy_args
    assert isinstance(pa, PrivacyArguments)
    assert (pa.target_epsilon, pa.max_grad_norm, pa.accountant, pa.poisson_sampling, pa.max_physical_batch_size) == (
        3.0, 0.1, "pld", False, 4)


def test_beside_model_and_data_dataclasses_like_the_transformers_example_scripts():
    from dataclasses import dataclass

    @dataclass
    class ModelArguments:
        model_name_or_path: str = "tiny"

    @dataclass
    class DataArguments:
        max_seq_length: int = 64

    margs, dargs, targs = HfArgumentParser((ModelArguments, DataArguments, DPTrainingArguments)).parse_args_into_dataclasses(
        [*BASE, "--model_name_or_path", "m", "--max_seq_length", "32", "--noise_multiplier", "1.5", "--max_grad_norm", "0.5"]
    )
    assert margs.model_name_or_path == "m" and dargs.max_seq_length == 32
    assert targs.noise_multiplier == 1.5 and targs.max_grad_norm == 0.5


def test_json_file_and_dict_forms(tmp_path):
    config = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": "none", "target_epsilon": 8.0,
              "max_grad_norm": 0.25, "clipping": "per_layer", "num_train_epochs": 2}
    path = tmp_path / "dp.json"
    path.write_text(json.dumps(config))
    (from_file,) = HfArgumentParser(DPTrainingArguments).parse_json_file(str(path))
    (from_dict,) = HfArgumentParser(DPTrainingArguments).parse_dict(config)
    for args in (from_file, from_dict):
        assert args.target_epsilon == 8.0 and args.max_grad_norm == 0.25 and args.clipping == "per_layer"
        assert args.num_train_epochs == 2


@pytest.mark.parametrize("flags, named", [
    (["--fp16"], "fp16"),
    (["--auto_find_batch_size"], "auto_find_batch_size"),
    (["--train_sampling_strategy", "group_by_length"], "train_sampling_strategy"),
    (["--torch_compile"], "torch_compile"),
    # plain `--fsdp full_shard` is FSDP2 in transformers 5.x (supported since FSDP2 through DPTrainer landed); the
    # FSDP set-ups DP still refuses fail while parsing:
    (["--fsdp", "full_shard offload"], "FSDP CPU offload"),
    (["--fsdp", "full_shard", "--fsdp_config", '{"version": 1}'], "FSDP1"),
    (["--max_grad_norm", "0"], "max_grad_norm"),
    (["--accountant", "gdp"], "accountant"),
    (["--target_delta", "1.5"], "target_delta"),
])
def test_a_bad_command_line_fails_while_parsing(flags, named):
    with pytest.raises(PrivacyConfigError, match=named):
        HfArgumentParser(DPTrainingArguments).parse_args_into_dataclasses([*BASE, *flags])


@pytest.mark.parametrize("bad", [True, float("nan"), "1.0", -1.0])
def test_max_grad_norm_is_checked_the_same_way_everywhere(bad):
    """PrivacyArguments, the clipping engine and DPTrainingArguments share one check (True used to pass the engine)."""
    import torch

    from hf_ewtune.clipping import ClippingEngine

    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        PrivacyArguments(max_grad_norm=bad)
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        ClippingEngine(torch.nn.Linear(2, 1), max_grad_norm=bad)
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        DPTrainingArguments(output_dir="unused", use_cpu=True, max_grad_norm=bad)


def test_dptrainer_with_dp_training_arguments_trains_at_their_clipping_norm(tmp_path):
    args = DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                               per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True,
                               noise_multiplier=1.0, max_grad_norm=0.25, noise_seed=0)
    before = copy.deepcopy(args.__dict__)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data())
    assert trainer.privacy_args.max_grad_norm == 0.25 and trainer.noise_multiplier == 1.0
    assert trainer._engine.max_grad_norm == 0.25
    assert trainer.args.max_grad_norm == 0.0  # the Trainer's batch clipping is off on the trainer's copy ...
    assert trainer.args is not args and args.max_grad_norm == 0.25  # ... and the caller's object is untouched
    trainer.train()
    assert args.__dict__.keys() == before.keys()
    assert args.max_grad_norm == 0.25 and args.average_tokens_across_devices == before["average_tokens_across_devices"]
    assert trainer.privacy_state()["max_grad_norm"] == 0.25


def test_privacy_settings_given_twice_with_dp_training_arguments_raise(tmp_path):
    args = DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError, match="DPTrainingArguments"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data(), target_epsilon=3.0)


def test_plain_training_arguments_are_not_mutated(tmp_path):
    """Old main set max_grad_norm=0 and average_tokens_across_devices=False on the caller's own object."""
    args = _args(tmp_path, max_grad_norm=1.0, average_tokens_across_devices=True)
    DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=args, train_dataset=_data(), noise_multiplier=1.0,
              max_grad_norm=0.5)
    assert args.max_grad_norm == 1.0 and args.average_tokens_across_devices is True
    privacy = PrivacyArguments(noise_multiplier=1.0)
    trainer = DPTrainer(tiny_bert(vocab_size=len(TOK)), args, train_dataset=_data(), privacy_args=privacy)  # positional
    assert trainer.args.max_grad_norm == 0.0 and args.max_grad_norm == 1.0


def test_training_arguments_max_grad_norm_meant_as_clipping_norm_is_refused(tmp_path):
    """Old main silently trained at C = 1.0 when a user set TrainingArguments.max_grad_norm=0.1."""
    with pytest.raises(PrivacyConfigError, match="max_grad_norm=0.1"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_grad_norm=0.1), train_dataset=_data(),
                  noise_multiplier=1.0)
    trainer = DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, max_grad_norm=0.1),
                        train_dataset=_data(), noise_multiplier=1.0, max_grad_norm=0.1)
    assert trainer.privacy_args.max_grad_norm == 0.1


def test_parse_args_with_privacy_refuses_max_grad_norm_meant_as_clipping_norm(tmp_path):
    from hf_ewtune.arguments import parse_args_with_privacy

    with pytest.raises(PrivacyConfigError, match="--per_example_max_grad_norm 0.1"):
        parse_args_with_privacy(TrainingArguments, args=["--output_dir", str(tmp_path), "--max_grad_norm", "0.1",
                                                         "--noise_multiplier", "1"])
    _, pa = parse_args_with_privacy(TrainingArguments, args=["--output_dir", str(tmp_path), "--noise_multiplier", "1"])
    assert pa.max_grad_norm == 1.0


def test_torch_compile_is_refused_before_training(tmp_path):
    with pytest.raises(PrivacyConfigError, match="torch_compile"):
        DPTrainer(model=tiny_bert(vocab_size=len(TOK)), args=_args(tmp_path, torch_compile=True), train_dataset=_data(),
                  noise_multiplier=1.0)


def test_every_privacy_field_is_a_dp_training_arguments_flag():
    """One definition: a field added to PrivacyArguments (e.g. privacy_unit) is a DPTrainingArguments flag too."""
    import dataclasses

    dp_fields = {f.name for f in dataclasses.fields(DPTrainingArguments)}
    assert set(PrivacyArguments.field_names()) <= dp_fields
    help_text = HfArgumentParser(DPTrainingArguments).format_help()
    for name in PrivacyArguments.field_names():
        assert f"--{name}" in help_text, name
