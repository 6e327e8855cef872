"""``DPTrainer`` with DeepSpeed ZeRO-1/2 through ``TrainingArguments(deepspeed=...)`` (accelerate's DeepSpeed plugin).

Slow (marked ``slow``, skipped without ``deepspeed``): ONE ``torchrun --standalone --nproc_per_node 2
tests/zero/zero_trainer_cases.py`` launch (gloo, CPU; ~45 s) against the 1-process ``DPTrainer`` runs of
``tests/fsdp/trainer_cases.py`` (no DeepSpeed) on the same global Poisson batches. No emulation: with
``use_cpu=True`` transformers 5.25 makes only ``PartialState`` CPU (gloo) and never passes ``cpu=True`` to the
``Accelerator``, whose ``AcceleratorState`` then keeps the DeepSpeed plugin (``DistributedType.DEEPSPEED``):
``deepspeed_init``, ``deepspeed.initialize``, ``DeepSpeedEngineWrapper.backward`` + the engine's step and DeepSpeed
checkpoints are the stock code paths. Checked:

* sigma = 0: ZeRO-1 and ZeRO-2, full fine-tuning (tiny Llama, tied embeddings) and LoRA: the parameters equal the
  1-process ones (rtol 1e-5), with GA = 2, ``max_physical_batch_size=1`` and EMPTY Poisson slices on a rank
  (nobody hangs: timeout); DeepSpeed's ``gradient_clipping`` "auto" became 0, not the Trainer's default 1.0;
* only the surrogate reaches ZeRO's gradient hooks (one ``AccumulateGrad`` per parameter per micro-batch);
* pure noise: per-coordinate variance (sigma C / B)^2 (noise once per step, on one rank);
* a run stopped at checkpoint-2 (DeepSpeed checkpoint + ``_privacy_state.json``) and resumed in a fresh trainer has
  the uninterrupted run's accountant history and epsilon, and starts from the checkpoint's weights.

Fast: the refusals (ZeRO-0/3, offload, fp16, ``gradient_clipping``, tensor parallelism, user-level DP; DeepSpeed
asked for but not enabled by accelerate; a torch.distributed world that accelerate does not count), the rebuilt
DeepSpeed config of the trainer's copy of the arguments, and :class:`ZeroTrainerFeed` on a stand-in engine.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from torchrun_helpers import torchrun_two

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 900  # ~45 s on 2 idle cores; the shared test machine can be many times slower
STAGE2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


# ---- 2 processes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_trainer_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    workdir = str(tmp_path_factory.mktemp("zero_trainer"))
    torchrun_two(os.path.join(HERE, "zero", "zero_trainer_cases.py"), "--workdir", workdir, what="DeepSpeed Trainer",
                 timeout_s=TIMEOUT_S, extra_env={"DS_ACCELERATOR": "cpu"}, log_path=os.path.join(workdir, "launch.log"),
                 drop_env=("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
    return torch.load(os.path.join(workdir, "results.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    sys.path.insert(0, os.path.join(HERE, "fsdp"))
    import trainer_cases

    workdir = str(tmp_path_factory.mktemp("single"))
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = trainer_cases.run_case(name, 1, workdir)
        return cache[name]

    return get


def _assert_zero(r: dict, stage: int) -> None:
    assert r["deepspeed_enabled"] and r["engine_class"] == "DeepSpeedEngine", r["engine_class"]
    assert r["zero_stage"] == stage and r["zero_optimizer"] == "DeepSpeedZeroOptimizer"
    assert r["gradient_clipping"] == 0.0  # "auto" filled from the trainer's copy (max_grad_norm 0), not 1.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_full", "zero2_full", "zero1_lora", "zero2_lora"])
def test_sigma_zero_zero_trainer_equals_one_process(zero_trainer_runs, single, case):
    two, one = zero_trainer_runs[case], single(case.split("_")[1])
    _assert_zero(two, int(case[4]))
    assert two["sample_rate"] == one["sample_rate"] and two["expected_batch_size"] == one["expected_batch_size"]
    per_step = [sum(x) for x in zip(*(rank["examples"] for rank in two["per_rank"]))]
    assert per_step == one["per_rank"][0]["examples"]  # the same global Poisson draws, split over the ranks
    assert sum(rank["empties"] for rank in two["per_rank"]) > 0  # an empty slice happened; nobody hung
    assert two["steps"] == two["engine_global_steps"] == two["feed_steps"] == 3
    moved = 0.0
    for name, p in one["params"].items():
        # ZeRO accumulates and reduces the float64 model's gradients in float32: observed max |diff| 1.5e-7
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(two["rank_params"][1][name], two["rank_params"][0][name], rtol=0, atol=0)
        moved = max(moved, float((p - one["initial"][name]).abs().max()))
    assert moved > 1e-4  # the updates are not trivially zero
    if "lora" in case:
        assert all("lora_" in n for n in two["params"])


@pytest.mark.slow
def test_optimizer_from_the_deepspeed_config_equals_one_process_with_that_optimizer(zero_trainer_runs, single):
    """``"optimizer": {"type": "AdamW", ...}`` in the DeepSpeed config: transformers passes a DummyOptim and DeepSpeed
    builds torch's AdamW itself, wrapped by ZeRO-2. It updates from ZeRO's reduced (noised) gradient, i.e. it is
    post-processing: at sigma = 0 the update equals the 1-process ``adamw_torch`` run on the same Poisson batches."""
    two, one = zero_trainer_runs["zero2_ds_optimizer"], single("full_adamw")
    _assert_zero(two, 2)
    assert two["ds_optimizer_name"] == "adamw" and two["basic_optimizer"] == "AdamW"  # built by DeepSpeed
    per_step = [sum(x) for x in zip(*(rank["examples"] for rank in two["per_rank"]))]
    assert per_step == one["per_rank"][0]["examples"]
    assert two["steps"] == two["engine_global_steps"] == two["feed_steps"] == 3
    assert two["accumulations"] == [two["micro_batches"]]  # only the surrogate reached ZeRO's hooks
    moved = 0.0
    for name, p in one["params"].items():
        # ZeRO reduces the float64 model's gradients in float32 and Adam divides by sqrt(v): near-zero gradient
        # entries carry that rounding into the update. Observed max |diff| 3e-7 (o_proj), against steps of lr = 1e-3.
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(two["rank_params"][1][name], two["rank_params"][0][name], rtol=0, atol=0)
        moved = max(moved, float((p - one["initial"][name]).abs().max()))
    assert moved > 1e-3  # AdamW moved the weights (about lr = 1e-3 per step, 3 steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_full", "zero2_full", "resume"])
def test_only_the_surrogate_reaches_zero_gradient_hooks(zero_trainer_runs, case):
    """One AccumulateGrad per parameter per micro-batch (empty slices included): the model backward never formed a
    raw gradient for ZeRO's hooks to reduce."""
    r = zero_trainer_runs[case]
    assert r["accumulations"] == [r["micro_batches"]] and r["micro_batches"] > 0


@pytest.mark.slow
def test_noise_variance_through_zero_trainer_is_sigma_c_over_b_squared(zero_trainer_runs):
    """One SGD step (lr 1, GA 2) at sigma = 1000: update = -(clipped sum + noise)/B, variance (sigma C / B)^2."""
    r = zero_trainer_runs["variance"]
    _assert_zero(r, 2)
    flat = torch.cat([(p - r["initial"][n]).flatten() for n, p in r["params"].items()])
    ratio = float(flat.var()) / (r["noise_std"] / r["expected_batch_size"]) ** 2
    assert 0.9 < ratio < 1.1, ratio  # noise on both ranks or on both micro-batches: 2; none: ~0
    assert bool((flat != 0).all())
    for name, p in r["rank_params"][0].items():
        torch.testing.assert_close(r["rank_params"][1][name], p, rtol=0, atol=0)


@pytest.mark.slow
def test_evaluate_after_zero_training_runs_and_leaves_the_weights(zero_trainer_runs):
    """trainer.evaluate() after training goes through the DeepSpeed engine's own forward (no clipping, no step)."""
    r = zero_trainer_runs["zero2_full"]
    assert torch.isfinite(torch.tensor(r["eval"]["eval_loss"])) and "epsilon" in r["eval"]
    for name, p in r["params"].items():
        torch.testing.assert_close(r["params_after_eval"][name], p, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_resumed_zero_trainer_keeps_its_spent_budget(zero_trainer_runs):
    r = zero_trainer_runs["resume"]
    _assert_zero(r, 1)
    assert {"_privacy_state.json", "global_step2", "latest"} <= set(r["checkpoint_files"])
    assert r["resumed_steps"] == r["steps"] == 4 and r["resumed_global_step"] == 4
    assert r["resumed"] == r["uninterrupted"]  # the same accountant history, not 2 fresh steps
    assert r["resumed_epsilon"] == pytest.approx(r["uninterrupted_epsilon"], rel=1e-12)
    assert r["feed_steps"] == 4 and r["resumed_feed_steps"] == 2
    start, saved = r["resumed_start"], r["checkpoint_weights"]
    for name, p in start.items():  # the resumed run starts from checkpoint-2's weights, not the fresh model's
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)
    assert max(float((p - r["initial"][n]).abs().max()) for n, p in start.items()) > 0
    assert {"model.safetensors", "_privacy_state.json", "README.md"} <= set(r["final_files"])
    for name, p in r["params"].items():
        torch.testing.assert_close(r["final_weights"][name], p, rtol=0, atol=0, msg=name)


# ---- fast: refusals and set-up --------------------------------------------------------------------------------
@pytest.fixture
def clean_accelerate_env(monkeypatch):
    """accelerate's Accelerator exports ACCELERATE_USE_DEEPSPEED=true when given a DeepSpeed plugin: undo it."""
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.setenv(var, "")  # recorded: the original (usually unset) state comes back after the test
        monkeypatch.delenv(var)
    return monkeypatch


@pytest.mark.parametrize("config,named", [
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 .*FSDP2"),
    ({"zero_optimization": {"stage": 0}}, "ZeRO stage 0 .*DDP"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "ZeRO stage 0"),  # DeepSpeed's default: no ZeRO
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, "gradient_clipping=1 .*max_grad_norm"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 1, "offload_param": {"device": "nvme"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2}}, "tensor parallelism"),
])
def test_unsupported_deepspeed_configs_are_refused_while_parsing(tmp_path, clean_accelerate_env, config, named):
    from hf_ewtune import DPTrainingArguments

    with pytest.raises(PrivacyConfigError, match=named) as info:
        DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=config,
                            noise_multiplier=1.0)
    assert "DeepSpeed ZeRO stage 1/2" in str(info.value)  # what to use instead
    path = tmp_path / "ds.json"  # the same from a config file, through a plain TrainingArguments
    path.write_text(json.dumps(config))
    from hf_ewtune.training_arguments import reject_sharded_training

    with pytest.raises(PrivacyConfigError, match=named):
        reject_sharded_training(SimpleNamespace(deepspeed=str(path), fsdp=None))


def test_zero_1_and_2_configs_pass_the_privacy_checks(clean_accelerate_env):
    from hf_ewtune.training_arguments import reject_sharded_training

    for stage in (1, 2):
        for clip in ("auto", 0, 0.0, None):
            config = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"}}, "bf16":
                      {"enabled": "auto"}, "gradient_clipping": clip}
            reject_sharded_training(SimpleNamespace(deepspeed=config, fsdp=None))  # no error


BF16_FIX = "bf16 with DeepSpeed is not supported yet.*before the noise.*Use fp32 with DeepSpeed.*FSDP2 with bf16=True"


@pytest.mark.parametrize("kwargs,named", [
    ({"bf16": True}, "bf16=True with DeepSpeed"),  # "bf16": {"enabled": "auto"} would become true
    ({"bf16_full_eval": True}, "bf16_full_eval=True with DeepSpeed"),  # transformers fills "auto" with it too
    ({"deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}}, "DeepSpeed bf16 enabled"),
    ({"deepspeed": {"zero_optimization": {"stage": 1}, "bfloat16": {"enabled": "true"}}}, "DeepSpeed bfloat16 enabled"),
])
def test_bf16_with_deepspeed_is_refused_while_parsing(tmp_path, clean_accelerate_env, kwargs, named):
    """ZeRO-1/2 under bf16 keep, accumulate and reduce the clipped sums in bf16 BEFORE the noise is added (rank 0,
    boundary): the sum's sensitivity is no longer C. Refused before training, naming the setting and the fix."""
    from hf_ewtune import DPTrainingArguments

    kwargs = dict(kwargs)
    config = kwargs.pop("deepspeed", dict(STAGE2, bf16={"enabled": "auto"}))
    with pytest.raises(PrivacyConfigError, match=named) as info:
        DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=config,
                            noise_multiplier=1.0, **kwargs)
    assert __import__("re").search(BF16_FIX, str(info.value)), str(info.value)
    DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", noise_multiplier=1.0,
                        **kwargs)  # bf16 without DeepSpeed stays accepted (FSDP2 / DDP / one process)


@pytest.mark.parametrize("extra,named", [
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "torch_autocast .*Linear gradients"),
    ({"communication_data_type": "bf16"}, "communication_data_type=bf16"),
    ({"communication_data_type": "fp16"}, "communication_data_type=fp16"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, "grad_accum_dtype=bf16"),
])
def test_deepspeed_low_precision_gradient_paths_are_refused_while_parsing(tmp_path, clean_accelerate_env, extra,
                                                                           named):
    """fp32 model, but ZeRO would accumulate or reduce the un-noised clipped sums in bf16/fp16."""
    from hf_ewtune import DPTrainingArguments
    from hf_ewtune.training_arguments import reject_sharded_training

    with pytest.raises(PrivacyConfigError, match=named + ".*before the noise"):
        DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", noise_multiplier=1.0,
                            deepspeed=dict(STAGE2, **extra))
    fine = {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"},
            "torch_autocast": {"enabled": False}}
    reject_sharded_training(SimpleNamespace(deepspeed=dict(STAGE2, **fine), fsdp=None))  # fp32 paths: accepted


def test_bf16_from_accelerate_launch_with_deepspeed_is_refused(clean_accelerate_env):
    """`accelerate launch --mixed_precision bf16` with a DeepSpeed config exports ACCELERATE_MIXED_PRECISION=bf16."""
    from hf_ewtune.training_arguments import reject_sharded_training

    clean_accelerate_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_accelerate_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    clean_accelerate_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(PrivacyConfigError, match="mixed_precision bf16 with DeepSpeed.*" + BF16_FIX):
        reject_sharded_training(None)
    clean_accelerate_env.setenv("ACCELERATE_MIXED_PRECISION", "fp8")  # accelerate enables "bf16" for fp8 too
    with pytest.raises(PrivacyConfigError, match="mixed_precision fp8 with DeepSpeed.*" + BF16_FIX):
        reject_sharded_training(None)
    clean_accelerate_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    reject_sharded_training(None)  # fp32 ZeRO-2: accepted


def test_bf16_deepspeed_trainer_is_refused_before_training(tmp_path, clean_accelerate_env):
    """A plain TrainingArguments(bf16=True, deepspeed=...) handed to DPTrainer: refused at construction."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=1, bf16=True, deepspeed=dict(STAGE2, bf16={"enabled": "auto"}))
    assert args.hf_deepspeed_config.config["bf16"]["enabled"] is True  # what DeepSpeed would have trained in
    with pytest.raises(PrivacyConfigError, match="bf16=True with DeepSpeed.*" + BF16_FIX):
        DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0, max_grad_norm=0.5)


@pytest.mark.parametrize("env,named", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
     "offload_optimizer"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}, "gradient_clipping"),
])
def test_accelerate_deepspeed_config_environment_is_checked(clean_accelerate_env, env, named):
    """What `accelerate launch` with a DeepSpeed config exports (accelerate/utils/launch.py)."""
    from hf_ewtune.training_arguments import reject_sharded_training

    clean_accelerate_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for k, v in env.items():
        clean_accelerate_env.setenv(k, v)
    with pytest.raises(PrivacyConfigError, match=named):
        reject_sharded_training(None)
    clean_accelerate_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    clean_accelerate_env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    clean_accelerate_env.setenv("ACCELERATE_GRADIENT_CLIPPING", "auto")
    reject_sharded_training(None)  # ZeRO-2 without offload or clipping: accepted


def test_accelerate_deepspeed_config_file_is_read(tmp_path, clean_accelerate_env):
    from hf_ewtune.training_arguments import reject_sharded_training

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    clean_accelerate_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_accelerate_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(PrivacyConfigError, match="ZeRO stage 3"):
        reject_sharded_training(None)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    reject_sharded_training(None)


def test_reentrant_checkpointing_with_deepspeed_is_refused_while_parsing(tmp_path, clean_accelerate_env):
    from hf_ewtune import DPTrainingArguments

    with pytest.raises(PrivacyConfigError, match="reentrant activation checkpointing with DeepSpeed"):
        DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed=dict(STAGE2),
                            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
                            noise_multiplier=1.0)


def test_reentrant_checkpointing_under_zero_dp_is_refused_before_any_gradient():
    """The engine's full backward through reentrant blocks would hand raw gradients to ZeRO's AccumulateGrad hooks:
    refused before it runs (a model checkpointed that way by the user, under ZeroDP on a stand-in engine)."""
    from hf_ewtune.distributed.deepspeed_zero import ZeroDP
    from hf_ewtune.errors import UnsupportedModuleError
    from tests.test_clipping_llama import tiny_llama
    from tests.test_clipping_oracle import gpt2_batch, lm_loss

    model = tiny_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    dp = ZeroDP(_stand_in(model, ga=1), max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=2.0)
    with pytest.raises(UnsupportedModuleError, match="use_reentrant.*DeepSpeed ZeRO"):
        dp.backward(lm_loss(dp.model, gpt2_batch(b=2, t=8, seed=1)))
    assert all(p.grad is None for p in model.parameters())
    dp.remove()


def _dataset(n=16):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [[2, 7, 9, 3]] * n, "attention_mask": [[1, 1, 1, 1]] * n,
                              "labels": [i % 2 for i in range(n)]})


def test_trainer_copy_rebuilds_the_deepspeed_config_without_batch_clipping(tmp_path, clean_accelerate_env):
    """TrainingArguments fills DeepSpeed's "auto" gradient_clipping with max_grad_norm (here C = 0.5): the trainer's
    copy must give DeepSpeed 0, or it would clip the noisy mean gradient."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    from hf_ewtune.training_arguments import trainer_facing_copy

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=0.5,
                             deepspeed=dict(STAGE2))
    assert args.hf_deepspeed_config.config["gradient_clipping"] == 0.5
    copy = trainer_facing_copy(args)
    assert copy.hf_deepspeed_config.config["gradient_clipping"] == 0.0
    assert copy.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert copy.deepspeed_plugin.hf_ds_config is copy.hf_deepspeed_config
    assert args.hf_deepspeed_config.config["gradient_clipping"] == 0.5  # the caller's object is unchanged


def test_deepspeed_trainer_is_set_up_with_the_zero_feed(tmp_path, clean_accelerate_env):
    """One process, no launcher: accelerate enables DeepSpeed at construction (training would need a process group).
    The feed is the privacy callback's noise source and the optimizer is not a DPOptimizer."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.distributed.deepspeed_zero import ZeroTrainerFeed
    from hf_ewtune.testing import tiny_bert

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=1, deepspeed=dict(STAGE2))
    trainer = DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0,
                        max_grad_norm=0.5)
    assert trainer.is_deepspeed_zero and isinstance(trainer._zero_feed, ZeroTrainerFeed)
    assert trainer.privacy_callback.noise_source is trainer._zero_feed
    assert trainer._zero_feed.settings is trainer._dp_settings
    assert trainer._engine.raw_gradients_reduced_by == "DeepSpeed ZeRO"  # reentrant checkpointing refused
    assert trainer.accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert type(trainer.create_optimizer()).__name__ != "DPOptimizer"
    with pytest.raises(PrivacyStateError, match="added no noise"):  # a step ended before any noise was drawn
        trainer.privacy_callback._check_optimizer(trainer.optimizer)


def test_deepspeed_asked_for_but_not_enabled_by_accelerate_is_refused(tmp_path, clean_accelerate_env):
    """ACCELERATE_USE_CPU (accelerate launch --cpu) makes AcceleratorState drop the DeepSpeed plugin."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert

    clean_accelerate_env.setenv("ACCELERATE_USE_CPU", "true")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=1, deepspeed=dict(STAGE2))
    with pytest.raises(PrivacyConfigError, match="did not enable it") as info:
        DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0)
    assert "ZeroDP" in str(info.value)


def test_user_level_dp_with_deepspeed_is_refused(tmp_path, clean_accelerate_env):
    pytest.importorskip("deepspeed")
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert

    data = Dataset.from_dict({"input_ids": [[2, 7, 9, 3]] * 16, "attention_mask": [[1, 1, 1, 1]] * 16,
                              "labels": [i % 2 for i in range(16)], "user": [i % 8 for i in range(16)]})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             max_steps=1, deepspeed=dict(STAGE2))
    with pytest.raises(PrivacyConfigError, match="user_id_column .*DeepSpeed"):
        DPTrainer(model=tiny_bert(), args=args, train_dataset=data, noise_multiplier=1.0, user_id_column="user")


def test_a_process_group_accelerate_does_not_count_is_refused(tmp_path, monkeypatch):
    """DeepSpeed without use_cpu on CPU processes: deepspeed starts a 2-process group but accelerate counts 1
    process on every rank (TrainingArguments.world_size 1): q, the sampler's split and the noise would be wrong."""
    from transformers import TrainingArguments

    from hf_ewtune import DPTrainer
    from hf_ewtune.testing import tiny_bert

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=1)
    trainer = DPTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(), noise_multiplier=1.0)
    trainer._check_environment()  # one process, no group: fine
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(PrivacyConfigError, match="world size mismatch: torch.distributed runs 2"):
        trainer._check_environment()


# ---- ZeroTrainerFeed on a stand-in engine (no deepspeed) -------------------------------------------------------
def _stand_in(module, ga):
    from tests.test_deepspeed_zero import _RecordingEngine

    return _RecordingEngine(module, ga)


def test_zero_trainer_feed_hands_zero_the_clipped_sum_over_the_public_batch_and_noises_once(monkeypatch):
    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.distributed.deepspeed_zero import ZeroTrainerFeed
    from hf_ewtune.dp_settings import DPSettings
    from hf_ewtune.errors import UnsupportedModuleError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    ref.load_state_dict(model.state_dict())
    xs = [torch.randn(3, 5, dtype=torch.float64), None, torch.randn(2, 5, dtype=torch.float64)]
    oracle = ClippingEngine(ref, max_grad_norm=0.3)
    for x in xs[::2]:
        oracle.backward(ref(x).pow(2).sum(1))
    clipping = ClippingEngine(model, max_grad_norm=0.3)
    engine = _stand_in(model, ga=3)
    steps = {"n": 0}
    feed = ZeroTrainerFeed(settings=DPSettings(noise_multiplier=0.0, sensitivity=0.3, expected_batch_size=4.0),
                           noise_seed=1, step_index_fn=lambda: steps["n"], clipping_norm_fn=lambda: clipping.sensitivity)
    with pytest.raises(UnsupportedModuleError, match="deepspeed.initialize"):
        feed.bind(model)  # not a DeepSpeed engine
    feed.bind(engine)
    for i, x in enumerate(xs):
        feed.begin()
        if x is not None:
            clipping.backward(model(x).pow(2).sum(1))
        feed.finish(boundary=i == 2, backward=lambda loss: engine.backward(loss, scale_wrt_gas=False))
        engine.step()
    assert len(engine.seen) == 1 and feed.steps_taken == 1 and feed.last_step_settings is feed.settings
    for n, p in ref.named_parameters():
        torch.testing.assert_close(engine.seen[0][n], p.grad / 4.0, rtol=1e-12, atol=1e-14, msg=n)
    # noise: drawn once, on the boundary micro-batch only (2 empty micro-batches, GA 2)
    big = torch.nn.Linear(200, 100, bias=False)
    torch.nn.init.zeros_(big.weight)
    engine = _stand_in(big, ga=2)
    feed = ZeroTrainerFeed(settings=DPSettings(noise_multiplier=2.0, sensitivity=1.0, expected_batch_size=8.0),
                           noise_seed=3, step_index_fn=lambda: 0, clipping_norm_fn=lambda: 1.0)
    feed.bind(engine)
    for i in range(2):
        feed.begin()
        feed.finish(boundary=i == 1, backward=lambda loss: engine.backward(loss, scale_wrt_gas=False))
        engine.step()
    std = float(engine.seen[0]["weight"].std())
    assert abs(std / (2.0 / 8.0) - 1) < 0.03, std
    # a clipping norm changed after set-up is refused before the step's noise
    feed = ZeroTrainerFeed(settings=DPSettings(noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=8.0),
                           noise_seed=3, step_index_fn=lambda: 0, clipping_norm_fn=lambda: 2.0)
    feed.bind(engine)
    feed.begin()
    with pytest.raises(PrivacyStateError, match="clipping norm changed"):
        feed.finish(boundary=True, backward=lambda loss: engine.backward(loss, scale_wrt_gas=False))
