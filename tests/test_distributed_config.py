"""Fast checks of the multi-process set-up: sharded training is rejected, the accelerate configs are sane."""

from __future__ import annotations

import os

import pytest
import yaml
from transformers import TrainingArguments

from hf_ewtune import DPTrainer
from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.testing import tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "accelerate")


def _dataset(n=16):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [[2, 7, 9, 3]] * n, "attention_mask": [[1, 1, 1, 1]] * n,
                              "labels": [i % 2 for i in range(n)]})


def test_fsdp_is_rejected_before_training_naming_what_is_missing(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", fsdp="full_shard",
                             fsdp_config={"version": 1},  # FSDP1 (FSDP2 is supported since; see test_fsdp_trainer.py)
                             per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(PrivacyConfigError, match="FSDP") as info:
        DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0)
    assert "per-example clipping across sharded parameters" in str(info.value)
    assert "--multi_gpu" in str(info.value)


# DeepSpeed ZeRO-1/2 (accelerate's default stage 2) is supported since (tests/test_zero_trainer.py): the DeepSpeed
# case exports ZeRO stage 3, which is still refused.
@pytest.mark.parametrize("var,name,extra", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
                                            ("ACCELERATE_USE_FSDP", "FSDP", {})])
def test_sharding_from_the_accelerate_config_is_rejected(tmp_path, monkeypatch, var, name, extra):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             per_device_train_batch_size=4, max_steps=1)
    # `accelerate launch` with a DeepSpeed / FSDP config exports these variables to every process. (Set after
    # building the arguments: TrainingArguments itself would import deepspeed, which is not installed here.)
    monkeypatch.setenv(var, "true")
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PrivacyConfigError, match=name):
        DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0)


def test_plain_single_process_run_is_not_affected(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             per_device_train_batch_size=4, max_steps=1)
    trainer = DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0)
    assert trainer.args.world_size == 1


@pytest.mark.parametrize("name,machines", [("cpu_2proc.yaml", 1), ("one_machine_multi_gpu.yaml", 1),
                                           ("multi_machine.yaml", 2)])
def test_accelerate_configs_use_the_multi_process_launcher_without_sharding(name, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    with open(os.path.join(CONFIGS, name)) as fh:
        raw = yaml.safe_load(fh)
    # MULTI_CPU / use_cpu would make `accelerate launch` start ONE process (accelerate 1.15).
    assert raw["distributed_type"] == "MULTI_GPU" and raw["use_cpu"] is False
    assert "fsdp_config" not in raw and "deepspeed_config" not in raw
    config = load_config_from_file(os.path.join(CONFIGS, name))
    assert config.num_machines == machines and config.num_processes >= 2
