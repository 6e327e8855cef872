"""``DPTrainer`` under accelerate's FSDP2 plugin (``fsdp=True, fsdp_config={"version": 2}``) on 2 CPU processes.

Two ``torchrun --standalone --nproc_per_node 2 tests/fsdp/trainer_cases.py`` launches (training cases; resumes)
run the cases (marked ``slow``); the 1-process references run in this process WITHOUT FSDP on the same global Poisson batches.
accelerate 1.16 drops the FSDP plugin on CPU processes, so the launch script applies a test-only emulation of
accelerate's GPU branch (``trainer_cases.emulate_accelerate_fsdp_on_cpu``, docstring there); every other piece
(accelerate's ``fsdp2_prepare_model``, the optimizer re-bound to the ``DTensor`` shards, FSDP checkpoints) is the
library code a GPU run uses. Checked:

* sigma = 0: the FSDP2 parameters equal the 1-process ones to 1e-5 (tiny Llama, tied embeddings, RMSNorm;
  full fine-tuning and LoRA), with gradient accumulation, ``max_physical_batch_size=1`` (ranks run different
  numbers of chunks and pad with zero-weight rows) and EMPTY Poisson slices on a rank (nobody hangs: timeout);
* bf16 (FSDP2 ``MixedPrecisionPolicy``): sharded fp32 master weights, the update close to the fp32 1-process one;
* pure noise through the Trainer: per-coordinate variance (sigma C lr / B)^2 (not double, not half), every
  coordinate noised, the two ranks' shards different draws;
* ``gradient_checkpointing=True`` (HF's default, non-reentrant): the sigma = 0 update equals the 1-process run
  without checkpointing, and the recomputation really ran;
* a run stopped at checkpoint-2 (FSDP model + optimizer state + ``_privacy_state.json``; SHARDED_STATE_DICT with
  SGD and FULL_STATE_DICT with AdamW) and resumed in a fresh trainer has the uninterrupted run's accountant history
  and epsilon; FULL_STATE_DICT writes the trained weights as a ``from_pretrained`` folder; torch DCP's lr-0
  optimizer-state initialisation at save/load is not counted as a DPOptimizer step.

The fast tests at the end check the refusals (FSDP1, CPU offload, FSDP activation checkpointing, reentrant
gradient checkpointing with FSDP2, XLA, DeepSpeed).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torchrun_helpers import torchrun_two

HERE = os.path.dirname(os.path.abspath(__file__))
FSDP_DIR = os.path.join(HERE, "fsdp")
sys.path.insert(0, FSDP_DIR)

import trainer_cases  # noqa: E402

TIMEOUT_S = 900  # ~60-90 s on 2 idle cores; the shared test machine can be many times slower


def _launch(workdir: str, cases: tuple[str, ...]) -> dict:
    torchrun_two(os.path.join(FSDP_DIR, "trainer_cases.py"), "--workdir", workdir, "--cases", ",".join(cases),
                 what="FSDP2 Trainer", timeout_s=TIMEOUT_S, log_path=os.path.join(workdir, "launch.log"))
    return torch.load(os.path.join(workdir, "results.pt"), weights_only=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One launch for the training cases (the resumes have their own launch: a checkpoint failure stays separate)."""
    return _launch(str(tmp_path_factory.mktemp("fsdp_trainer")), ("full", "lora", "bf16", "variance", "ckpt"))


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    return _launch(str(tmp_path_factory.mktemp("fsdp_trainer_resume")), ("resume", "resume_full"))


@pytest.fixture(params=["resume", "resume_full"])
def resumed(resumed_runs, request):
    """SHARDED_STATE_DICT (plain SGD) and FULL_STATE_DICT (transformers' default; AdamW) checkpoints."""
    return resumed_runs[request.param]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = trainer_cases.run_case(name, 1, workdir)
        return cache[name]

    return get


def _assert_fsdp2(r: dict) -> None:
    assert r["fsdp_enabled"] and r["sharded"], "accelerate did not shard the model"
    assert r["model_class"].startswith("FSDP"), r["model_class"]  # fully_shard swaps the class


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_sigma_zero_fsdp2_trainer_equals_one_process(sharded, single, case):
    two, one = sharded[case], single(case)
    _assert_fsdp2(two)
    assert not one["sharded"]
    assert two["sample_rate"] == one["sample_rate"] and two["expected_batch_size"] == one["expected_batch_size"]
    # the same global Poisson draws, split over the ranks
    per_step = [sum(x) for x in zip(*(rank["examples"] for rank in two["per_rank"]))]
    assert per_step == one["per_rank"][0]["examples"]
    # an empty slice on a rank happened (it ran a zero-weight dummy row; nobody hung)
    assert sum(rank["empties"] for rank in two["per_rank"]) > 0
    moved = 0.0
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-7, msg=name)
        moved = max(moved, float((p - one["initial"][name]).abs().max()))
    assert moved > 1e-4  # the updates are not trivially zero
    if case == "lora":
        assert all("lora_" in n for n in two["params"])


@pytest.mark.slow
def test_bf16_fsdp2_trainer_keeps_fp32_shards_and_matches_fp32_update(sharded, single):
    two, one = sharded["bf16"], single("bf16")
    _assert_fsdp2(two)
    assert two["param_dtypes"] == ["torch.float32"]  # sharded master weights stay fp32 (MixedPrecisionPolicy)
    num = den = 0.0
    for name, p in one["params"].items():
        d1, d2 = p - one["initial"][name], two["params"][name] - two["initial"][name]
        num += float((d2 - d1).double().pow(2).sum())
        den += float(d1.double().pow(2).sum())
    assert den > 0
    assert (num / den) ** 0.5 < 0.1, (num / den) ** 0.5  # bf16 rounding, not a different update


@pytest.mark.slow
def test_noise_variance_through_fsdp2_trainer_is_sigma_c_over_b_squared(sharded):
    """One SGD step (lr 1) at sigma = 1000: update = -(clipped sum + noise)/B, variance (sigma C / B)^2."""
    r = sharded["variance"]
    _assert_fsdp2(r)
    deltas = {n: (p - r["initial"][n]).flatten() for n, p in r["params"].items()}
    flat = torch.cat(list(deltas.values()))
    expected = (r["noise_std"] / r["expected_batch_size"]) ** 2
    ratio = float(flat.var()) / expected
    assert 0.9 < ratio < 1.1, ratio  # noise on both ranks' copies: 2; a shard not noised: 0.5 and zeros
    assert bool((flat != 0).all())
    big = max(deltas.values(), key=len)  # rank 0's rows and rank 1's rows: different draws
    half = len(big) // 2
    assert not torch.equal(big[:half], big[half:2 * half])


@pytest.mark.slow
def test_resumed_fsdp2_trainer_keeps_its_spent_budget(resumed):
    r = resumed
    _assert_fsdp2(r)
    assert "_privacy_state.json" in r["checkpoint_files"]
    assert any("fsdp" in f or f.startswith("optimizer") for f in r["checkpoint_files"]), r["checkpoint_files"]
    assert r["resumed_steps"] == r["steps"] == 4 and r["resumed_global_step"] == 4
    assert r["resumed"] == r["uninterrupted"]  # the same accountant history, not 2 fresh steps
    assert r["resumed_epsilon"] == pytest.approx(r["uninterrupted_epsilon"], rel=1e-12)


@pytest.mark.slow
def test_full_state_dict_saves_a_from_pretrained_folder_with_the_trained_weights(resumed_runs):
    """FULL_STATE_DICT used to crash at the first save in this test (rank 0 met DTensors in save_pretrained):
    the CPU emulation left PartialState at MULTI_CPU, so accelerate's get_state_dict skipped its FSDP2 gather."""
    r = resumed_runs["resume_full"]
    _assert_fsdp2(r)
    assert {"model.safetensors", "config.json", "_privacy_state.json"} <= set(r["checkpoint_files"])
    assert {"model.safetensors", "config.json", "_privacy_state.json", "README.md"} <= set(r["final_files"])
    saved = r["final_weights"]
    for name, p in r["params"].items():  # the gathered trained parameters, not the initial ones
        torch.testing.assert_close(saved[name], p, rtol=0, atol=0, msg=name)
    assert max(float((p - r["initial"][n]).abs().max()) for n, p in r["params"].items()) > 0


@pytest.mark.slow
def test_dcp_optimizer_state_initialisation_is_not_counted_as_a_step(resumed_runs):
    """torch DCP calls DPOptimizer.step at lr 0 to build a missing optimizer state: plain SGD at every save and
    load, AdamW at the load. Only the 4 (2 resumed) real steps count."""
    for case in ("resume", "resume_full"):
        r = resumed_runs[case]
        assert r["optimizer_steps"] == r["steps"] == 4, case
        assert r["resumed_optimizer_steps"] == 2, case


@pytest.mark.slow
def test_non_reentrant_gradient_checkpointing_under_fsdp2_equals_one_process(sharded, single):
    """gradient_checkpointing=True with Hugging Face's default kwargs (use_reentrant=False in transformers 5):
    the 'full' case's update, against the 1-process run WITHOUT checkpointing and without FSDP."""
    two, one, plain = sharded["ckpt"], single("full"), sharded["full"]
    _assert_fsdp2(two)
    assert two["checkpointing"] and not plain["checkpointing"]
    for rank_ckpt, rank_plain in zip(two["per_rank"], plain["per_rank"]):  # the recomputation really ran
        assert rank_ckpt["layer_calls"] == 2 * rank_plain["layer_calls"] > 0
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------- fast refusals
def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=1, **kw)


@pytest.mark.parametrize("kw,named", [
    (dict(fsdp=True, fsdp_config={"version": 1}), "FSDP1"),
    (dict(fsdp=True, fsdp_config={"version": 2, "cpu_offload": True}), "CPU offload"),
    (dict(fsdp="full_shard offload"), "CPU offload"),
    (dict(fsdp=True, fsdp_config={"fsdp_version": 2, "fsdp_activation_checkpointing": True}), "activation checkpointing"),
    (dict(fsdp=True, fsdp_config={"version": 2}, gradient_checkpointing=True,
          gradient_checkpointing_kwargs={"use_reentrant": True}), "reentrant activation checkpointing"),
    (dict(fsdp=True, fsdp_config={"version": 2}, activation_checkpointing=True,
          activation_checkpointing_kwargs={"use_reentrant": True}), "use_reentrant=False"),
])
def test_unsupported_fsdp_arguments_are_refused_naming_them(tmp_path, kw, named):
    from hf_ewtune import DPTrainer
    from hf_ewtune.errors import PrivacyConfigError
    from hf_ewtune.testing import tiny_bert

    with pytest.raises(PrivacyConfigError, match=named):
        DPTrainer(model=tiny_bert(), args=_args(tmp_path, **kw), train_dataset=[{"input_ids": [1], "labels": 0}] * 8,
                  noise_multiplier=1.0)


def test_fsdp2_arguments_pass_the_privacy_checks(tmp_path, monkeypatch):
    from hf_ewtune.training_arguments import reject_sharded_training

    reject_sharded_training(_args(tmp_path, fsdp=True, fsdp_config={"version": 2}))  # no error
    reject_sharded_training(_args(tmp_path, fsdp=True, fsdp_config={"version": 2}, gradient_checkpointing=True))
    no_fsdp = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # TrainingArguments(fsdp=...) above may export it
    reject_sharded_training(no_fsdp)  # without FSDP reentrant checkpointing is fine


def test_full_state_dict_with_plain_sgd_is_flagged_as_not_resumable(tmp_path):
    """torch cannot load a full optimizer state dict of an optimizer without state tensors (plain SGD)."""
    from types import SimpleNamespace

    from hf_ewtune.distributed.fsdp import full_state_dict_resume_problem

    full = SimpleNamespace(state_dict_type="StateDictType.FULL_STATE_DICT")
    sharded = SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
    assert "state_dict_type" in full_state_dict_resume_problem(full, _args(tmp_path, optim="sgd"))
    assert full_state_dict_resume_problem(sharded, _args(tmp_path, optim="sgd")) is None
    assert full_state_dict_resume_problem(full, _args(tmp_path)) is None  # AdamW (the default)
    assert full_state_dict_resume_problem(full, _args(tmp_path, optim="sgd", optim_args="momentum=0.9")) is None


def test_reentrant_checkpointing_on_fsdp2_parameters_is_refused_before_any_gradient(tmp_path):
    """A model checkpointed with use_reentrant=True by the user (not through TrainingArguments): the engine
    refuses at the first backward, before it runs (the full backward would reduce-scatter raw gradients)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.errors import UnsupportedModuleError
    from tests.test_clipping_llama import tiny_llama
    from tests.test_clipping_oracle import gpt2_batch, lm_loss

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_llama()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        engine = ClippingEngine(model, max_grad_norm=0.05)
        with pytest.raises(UnsupportedModuleError, match="use_reentrant"):
            engine.backward(lm_loss(model, gpt2_batch(b=2, t=8, seed=1)))
        assert all(p.grad is None for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("env,named", [
    ({"FSDP_VERSION": "1"}, "FSDP1"),
    ({}, "FSDP1"),  # accelerate's own default
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "CPU offload"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "activation checkpointing"),
])
def test_accelerate_fsdp_config_environment_is_checked(monkeypatch, env, named):
    from hf_ewtune.errors import PrivacyConfigError
    from hf_ewtune.training_arguments import reject_sharded_training

    for var in ("FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PrivacyConfigError, match=named):
        reject_sharded_training(None)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS", raising=False)
    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING", raising=False)
    reject_sharded_training(None)  # accelerate launch with `fsdp_version: 2`: accepted


def test_accelerate_fsdp_plugin_is_checked():
    from accelerate import FullyShardedDataParallelPlugin

    from hf_ewtune.training_arguments import unsupported_fsdp_plugin

    assert unsupported_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2)) == []
    assert "CPU offload" in " ".join(unsupported_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2,
                                                                                            cpu_offload=True)))
    assert "FSDP1" in " ".join(unsupported_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1)))


def test_fsdp2_accelerate_config_file_passes_the_privacy_checks(monkeypatch):
    """examples/accelerate/one_machine_fsdp2.yaml: FSDP2, no offload; the environment it exports is accepted."""
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_ewtune.training_arguments import reject_sharded_training

    path = os.path.join(os.path.dirname(HERE), "examples", "accelerate", "one_machine_fsdp2.yaml")
    config = load_config_from_file(path)
    fsdp = config.fsdp_config
    assert str(config.distributed_type).endswith("FSDP") and int(fsdp["fsdp_version"]) == 2
    # what `accelerate launch` exports from it (accelerate/utils/launch.py)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(fsdp["fsdp_version"]))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", str(fsdp["fsdp_offload_params"]).lower())
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", str(fsdp["fsdp_activation_checkpointing"]).lower())
    reject_sharded_training(None)


def test_torch_func_rule_does_not_refire_the_hooks_of_accelerates_fsdp2_tail_group(tmp_path):
    """accelerate shards [final norm, embed_tokens, lm_head] as ONE FSDP2 group; the RMSNorm's per-example
    recomputation used to call the module, re-fire the group's pre-forward hook (an all-gather) and leave
    embed_tokens holding the unsharded parameter (the next forward then mixed Tensor and DTensor). One process
    (gloo, world size 1) is enough to show it; the clipped sums must equal the unsharded engine's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_ewtune.clipping import ClippingEngine
    from tests.test_clipping_llama import tiny_llama
    from tests.test_clipping_oracle import gpt2_batch, lm_loss

    ref = tiny_llama()
    ref_engine = ClippingEngine(ref, max_grad_norm=0.05)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_llama()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
        engine = ClippingEngine(model, max_grad_norm=0.05)
        for seed in (1, 2):  # the second forward is the one that failed
            batch = gpt2_batch(b=3, t=8, seed=seed)
            engine.backward(lm_loss(model, batch))
            ref_engine.backward(lm_loss(ref, batch))
            assert isinstance(model.model.embed_tokens.weight, DTensor)
            assert model.lm_head.weight is model.model.embed_tokens.weight
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    finally:
        torch.distributed.destroy_process_group()
