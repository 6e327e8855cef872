"""FSDP2 (``fully_shard``) DP-SGD on 2 CPU processes (gloo) under ``torchrun``, against the 1-process run.

The 2-process tests are marked ``slow`` (one launch, ~80-110 s on 2 loaded cores), like tests/test_distributed.py.

One launch (``tests/fsdp/fsdp_cases.py``) runs every case; the 1-process references run in this process on the
same global batches. Checked:

* sigma = 0: the 2-process sharded parameters equal the 1-process ones to 1e-5 (full fine-tuning of a tiny
  Llama with tied embeddings and RMSNorm through the torch.func rule; LoRA), with gradient accumulation and an
  EMPTY micro-batch on rank 1 (it runs a zero-weight dummy row; nobody hangs: subprocess timeout);
* the pure-noise update has per-coordinate variance (sigma C lr / B)^2: not double (two ranks noising a
  coordinate), not half (a coordinate left un-noised), and the two shards' noise is not the same draw;
* the same when the engine is built BEFORE ``fully_shard`` replaces the parameters (it follows them);
* FSDP1 wrappers and FSDP2 CPU offload are refused with errors naming them.
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

import fsdp_cases  # noqa: E402

TIMEOUT_S = 420


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp") / "results.pt")
    torchrun_two(os.path.join(FSDP_DIR, "fsdp_cases.py"), "--out", out, "--cases", "full,lora,variance,engine_first",
                 what="FSDP2", timeout_s=TIMEOUT_S)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora", "engine_first"])
def test_sigma_zero_fsdp2_equals_one_process(sharded, case):
    two, one = sharded[case], fsdp_cases.run_case(case, 1)
    assert two["sharded"] and not one["sharded"]
    initial = dict(fsdp_cases._model("lora" if case == "lora" else "full").named_parameters())
    moved = 0.0
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-7, msg=name)
        moved = max(moved, float((p - initial[name].detach()).abs().max()))
    assert moved > 1e-4  # the updates are not trivially zero


@pytest.mark.slow
def test_noise_variance_per_coordinate_is_sigma_c_over_b_squared(sharded):
    """4 steps of pure noise (loss x 0), SGD lr=1: update = -(sum of noise)/B, variance 4 (sigma C / B)^2."""
    result = sharded["variance"]
    initial = dict(fsdp_cases._model("full").named_parameters())
    deltas = {n: (p - initial[n].detach()).flatten() for n, p in result["params"].items()}
    flat = torch.cat(list(deltas.values()))
    expected = 4 * (fsdp_cases.C / fsdp_cases.B_EXP) ** 2
    ratio = float(flat.var()) / expected
    assert 0.9 < ratio < 1.1, ratio  # double would be 2, half 0.5; n ~ 2e4 coordinates
    assert bool((flat != 0).all())  # every coordinate noised
    big = max(deltas.values(), key=len)  # rank 0's rows and rank 1's rows: different draws
    half = len(big) // 2
    assert not torch.equal(big[:half], big[half:2 * half])


def test_fsdp1_is_refused():
    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.errors import UnsupportedModuleError

    class FullyShardedDataParallel(torch.nn.Module):  # stands for torch's FSDP1 wrapper (needs a process group)
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(UnsupportedModuleError, match="FSDP1"):
        ClippingEngine(torch.nn.Sequential(FullyShardedDataParallel()), max_grad_norm=1.0)


@pytest.mark.slow
def test_fsdp2_cpu_offload_is_refused(sharded):
    assert "CPU offload" in sharded["offload_error"], sharded["offload_error"]


def test_engine_follows_parameters_replaced_after_it_was_built():
    """What fully_shard does to an engine built earlier (DPTrainer builds it before accelerate shards)."""
    from hf_ewtune.clipping import ClippingEngine
    from hf_ewtune.errors import UnsupportedModuleError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    engine = ClippingEngine(model, max_grad_norm=1e6)
    old = model[0].weight
    model[0].weight = torch.nn.Parameter(old.detach().clone() + 1.0)
    x = torch.randn(4, 3)
    engine.backward(model(x).sum(1))
    assert old.grad is None
    torch.testing.assert_close(model[0].weight.grad, torch.ones(2, 1) * x.sum(0))
    model[0].bias.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match="trainable parameters changed"):
        engine.backward(model(x).sum(1))
