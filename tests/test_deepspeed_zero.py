"""DeepSpeed ZeRO-1/2 DP-SGD (``hf_ewtune.distributed.deepspeed_zero.ZeroDP``) and its refusals.

Fast (no deepspeed needed): the set-ups the contract does not cover are refused before training, and a DeepSpeed
config outside the contract (ZeRO-3) through ``DPTrainingArguments`` is refused naming it (ZeRO-1/2 through ``DPTrainer``:
``tests/test_zero_trainer.py``).

Slow (marked ``slow``; skipped when ``deepspeed`` is not installed): one ``torchrun --nproc_per_node 2`` launch of
``tests/zero/zero_cases.py`` (gloo, CPU), against the 1-process runs of ``tests/fsdp/fsdp_cases.py`` on the same
global batches:

* sigma = 0: ZeRO-1 and ZeRO-2 parameters equal the 1-process ones to 1e-5 (full fine-tuning of a tiny Llama with
  tied embeddings; LoRA), with 2 micro-batches per step and an EMPTY slice on rank 1 (no forward; nobody hangs);
* raw gradients never reach ``AccumulateGrad`` (where ZeRO's reduce hooks sit) except through the one surrogate
  backward per micro-batch: no unclipped gradient is reduced;
* the pure-noise update has per-coordinate variance 4 (sigma C / B)^2 (noise once per coordinate: not 2x, not 0.5x).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from hf_ewtune.distributed.deepspeed_zero import check_zero_engine
from hf_ewtune.errors import PrivacyConfigError, UnsupportedModuleError
from torchrun_helpers import torchrun_two

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 900


def _fake_engine(stage=2, clip=0.0, fp16=False, offload=None, bf16=False):
    """The few DeepSpeedEngine methods check_zero_engine reads (no deepspeed import needed)."""
    return SimpleNamespace(module=torch.nn.Linear(2, 1), backward=None, step=None,
                           zero_optimization_stage=lambda: stage, gradient_clipping=lambda: clip,
                           fp16_enabled=lambda: fp16, bfloat16_enabled=lambda: bf16,
                           zero_offload_optimizer=lambda: offload,
                           zero_offload_param=lambda: None)


def test_zero_stage_1_and_2_fp32_are_accepted():
    check_zero_engine(_fake_engine(stage=1))
    check_zero_engine(_fake_engine(stage=2, offload=SimpleNamespace(device="OffloadDeviceEnum.none")))


@pytest.mark.parametrize("kwargs,match", [
    ({"stage": 3}, "ZeRO stage 3 .*FSDP2"),
    ({"stage": 0}, "ZeRO stage 0 .*DDP"),
    ({"clip": 1.0}, "gradient_clipping=1 .*max_grad_norm"),
    ({"fp16": True}, "fp16"),
    ({"bf16": True}, "bf16 with DeepSpeed is not supported yet.*Use fp32"),  # ZeroDP in a plain loop too
    ({"offload": SimpleNamespace(device="OffloadDeviceEnum.cpu")}, "offload_optimizer"),
])
def test_unsupported_deepspeed_setups_are_refused_naming_them(kwargs, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        check_zero_engine(_fake_engine(**kwargs))


@pytest.mark.parametrize("attrs,match", [
    ({"torch_autocast_enabled": lambda: True}, "torch_autocast"),
    ({"communication_data_type": torch.bfloat16}, "communication_data_type torch.bfloat16"),
    ({"get_data_types": lambda: (torch.float32, torch.bfloat16)}, "grad_accum_dtype torch.bfloat16"),
])
def test_zero_engines_that_round_the_clipped_sums_below_fp32_are_refused(attrs, match):
    engine = _fake_engine()
    for name, value in attrs.items():
        setattr(engine, name, value)
    with pytest.raises(UnsupportedModuleError, match=match + ".*before the noise"):
        check_zero_engine(engine)
    check_zero_engine(_fake_engine())  # fp32 everywhere: accepted


def test_the_engine_attributes_check_zero_engine_reads_exist_on_deepspeeds_engine():
    """check_zero_engine reads these with getattr defaults (stand-in engines): a rename in DeepSpeed must not turn
    a refusal into a silent pass."""
    engine_cls = pytest.importorskip("deepspeed.runtime.engine").DeepSpeedEngine
    for name in ("zero_optimization_stage", "gradient_clipping", "fp16_enabled", "bfloat16_enabled",
                 "torch_autocast_enabled", "communication_data_type", "get_data_types", "zero_offload_optimizer",
                 "zero_offload_param"):
        assert hasattr(engine_cls, name), name


def test_a_model_that_is_not_a_deepspeed_engine_is_refused():
    with pytest.raises(UnsupportedModuleError, match="deepspeed.initialize"):
        check_zero_engine(torch.nn.Linear(2, 1))


def test_deepspeed_in_dp_training_arguments_is_refused_before_deepspeed_is_imported(tmp_path):
    from hf_ewtune import DPTrainingArguments

    # ZeRO-1/2 through DPTrainer are supported since (tests/test_zero_trainer.py): ZeRO-3 is still refused
    with pytest.raises(PrivacyConfigError, match="DeepSpeed") as info:
        DPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                            deepspeed={"zero_optimization": {"stage": 3}}, noise_multiplier=1.0)
    assert "DDP" in str(info.value)


# ---- 2 processes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = str(tmp_path_factory.mktemp("zero") / "results.pt")
    torchrun_two(os.path.join(HERE, "zero", "zero_cases.py"), "--out", out, what="ZeRO", timeout_s=TIMEOUT_S,
                 extra_env={"DS_ACCELERATOR": "cpu"})
    return torch.load(out, weights_only=False), torch.load(out + ".rank1", weights_only=False)


def _fsdp_cases():
    sys.path.insert(0, os.path.join(HERE, "fsdp"))
    import fsdp_cases

    return fsdp_cases


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_full", "zero2_full", "zero1_lora", "zero2_lora"])
def test_sigma_zero_zero_dp_equals_one_process(zero_runs, case):
    fsdp_cases = _fsdp_cases()
    rank0, rank1 = zero_runs[0][case], zero_runs[1][case]
    kind = case.split("_")[1]
    stage = int(case[4])
    assert rank0["stage"] == stage and rank0["optimizer"] == "DeepSpeedZeroOptimizer"
    assert rank0["partition_gradients"] == (stage == 2)
    one = fsdp_cases.run_case(kind, 1)
    initial = dict(fsdp_cases._model(kind).named_parameters())
    moved = 0.0
    for name, p in one["params"].items():
        # ZeRO accumulates and reduces the float64 model's gradients in float32: observed max |diff| 1.4e-7.
        torch.testing.assert_close(rank0["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(rank1["params"][name], rank0["params"][name], rtol=0, atol=0, msg=name)
        moved = max(moved, float((p - initial[name].detach()).abs().max()))
    assert moved > 1e-4  # the updates are not trivially zero
    assert rank0["steps_taken"] == len(fsdp_cases.PLAN) == rank0["global_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_full", "zero2_full"])
def test_only_the_surrogate_reaches_zero_gradient_hooks(zero_runs, case):
    """One AccumulateGrad per parameter per micro-batch (the surrogate): the model backward never formed raw grads."""
    for result in zero_runs:
        counts = set(result[case]["accumulations"].values())
        assert counts == {result[case]["backwards"]}, counts


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_variance", "zero2_variance"])
def test_noise_variance_per_coordinate_is_sigma_c_over_b_squared(zero_runs, case):
    """4 steps of pure noise (loss x 0), SGD lr=1: update = -(sum of noise)/B, variance 4 (sigma C / B)^2."""
    fsdp_cases = _fsdp_cases()
    result = zero_runs[0][case]
    initial = dict(fsdp_cases._model("full").named_parameters())
    flat = torch.cat([(p - initial[n].detach()).flatten() for n, p in result["params"].items()])
    expected = 4 * (fsdp_cases.C / fsdp_cases.B_EXP) ** 2
    ratio = float(flat.var()) / expected
    assert 0.9 < ratio < 1.1, ratio  # noise on both ranks would give 2, on none 0
    assert bool((flat != 0).all())  # every coordinate noised
    for name, p in result["params"].items():  # ZeRO leaves both ranks with the same parameters
        torch.testing.assert_close(zero_runs[1][case]["params"][name], p, rtol=0, atol=0)


@pytest.mark.slow
def test_deepspeed_engine_forward_is_refused_while_zero_dp_is_attached(zero_runs):
    """engine(...) would hook the outputs so that the clipping backward is scaled by 1/GA and reduced mid-batch."""
    for case in ("zero1_full", "zero2_full"):
        assert "run the forward through dp.model" in zero_runs[0][case]["engine_forward"]


# ---- one process, a stand-in engine (no deepspeed): what ZeroDP hands to the engine's backward ----------------
class _RecordingEngine(torch.nn.Module):
    """Mimics DeepSpeedEngine's managed accumulation: backward() accumulates into p.grad, step() counts micro-steps
    and, on the boundary, records the gradient the optimizer would see and clears it."""

    def __init__(self, module, ga):
        super().__init__()
        self.module, self.ga, self.micro, self.seen = module, ga, 0, []

    zero_optimization_stage = staticmethod(lambda: 2)
    gradient_clipping = staticmethod(lambda: 0.0)
    fp16_enabled = staticmethod(lambda: False)
    zero_offload_optimizer = staticmethod(lambda: None)
    zero_offload_param = staticmethod(lambda: None)

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.ga == 0

    def forward(self, x):
        return self.module(x)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False  # ZeroDP divides by the public qN itself
        loss.backward()

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.seen.append({n: p.grad.clone() for n, p in self.module.named_parameters()})
            for p in self.module.parameters():
                p.grad = None
        self.micro += 1


def _per_example_losses(model, x):
    return model(x).pow(2).sum(1)


def test_zero_dp_feeds_the_clipped_sum_over_the_public_batch_without_noise():
    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.distributed.deepspeed_zero import ZeroDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    xs = [torch.randn(3, 5, dtype=torch.float64), None, torch.randn(2, 5, dtype=torch.float64)]
    ref = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    ref.load_state_dict(model.state_dict())
    oracle = ClippingEngine(ref, max_grad_norm=0.3)
    for x in xs[::2]:
        oracle.backward(_per_example_losses(ref, x))
    engine = _RecordingEngine(model, ga=3)
    dp = ZeroDP(engine, max_grad_norm=0.3, noise_multiplier=0.0, expected_batch_size=4.0, noise_seed=1)
    for x in xs:
        dp.backward(None if x is None else _per_example_losses(dp.model, x))
        dp.step()
    assert len(engine.seen) == 1 and dp.steps_taken == 1
    for n, p in ref.named_parameters():
        torch.testing.assert_close(engine.seen[0][n], p.grad / 4.0, rtol=1e-12, atol=1e-14, msg=n)
    with pytest.raises(UnsupportedModuleError, match="dp.model"):
        engine(xs[0])
    with pytest.raises(PrivacyConfigError, match="step"):
        dp.step()


def test_zero_dp_adds_the_noise_once_per_step_on_the_boundary():
    from hf_ewtune.distributed.deepspeed_zero import ZeroDP

    model = torch.nn.Linear(200, 100, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine = _RecordingEngine(model, ga=2)
    dp = ZeroDP(engine, max_grad_norm=1.0, noise_multiplier=2.0, expected_batch_size=8.0, noise_seed=3)
    for _ in range(2):  # two empty micro-batches: the step's gradient is the noise alone, divided by qN
        dp.backward(None)
        dp.step()
    std = float(engine.seen[0]["weight"].std())
    assert abs(std / (2.0 * 1.0 / 8.0) - 1) < 0.03, std  # noise twice (per micro-batch) would give sqrt(2)
