"""Multi-process DP training: 2 real processes on CPU (DDP over gloo) under ``accelerate launch``.

One launch (``tests/ddp/run_cases.py``, ~1 min) runs every case of ``tests/ddp/ddp_cases.py``; the
1-process references run in this process with the same global batches (same q N, same seed). Checked:

* sigma = 0: 2 processes give the 1-process parameters (full fine-tuning and LoRA), to 1e-5;
* with the same fixed noise seed, even the noisy run matches (rank 0 draws the 1-process noise);
* parameters are bitwise identical on both ranks after every step;
* before each optimizer step every rank holds only its OWN clipped sum (ranks differ; norm <= n_local C):
  no all-reduce of unclipped gradients;
* the pure-noise update has variance (sigma C lr / B_exp)^2 with 2 processes as with 1 (noise once);
* a run stopped at a checkpoint and resumed in a fresh trainer has the uninterrupted accountant history;
* with q = 4/160 ranks see empty micro-batches and empty slices, nobody hangs (subprocess timeout), every
  rank runs the same number of micro-batches, and epoch 2 redraws the batches.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DDP_DIR = os.path.join(HERE, "ddp")
sys.path.insert(0, DDP_DIR)

import ddp_cases  # noqa: E402
from torchrun_helpers import run_process_group  # noqa: E402

LAUNCH_TIMEOUT_S = 420
CASES = ("full", "lora", "noisy", "variance", "empty", "resume", "users")


def launch(script: str, *script_args: str, num_processes: int = 2, timeout: float = LAUNCH_TIMEOUT_S,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N`` on CPU; kills the whole process group on timeout."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        script, *script_args,
    ]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    full_env.update(env or {})
    returncode, out = run_process_group(cmd, env=full_env, timeout_s=timeout, what=f"{num_processes}-process launch")
    return subprocess.CompletedProcess(cmd, returncode, out, "")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ddp"))
    res = launch(os.path.join(DDP_DIR, "run_cases.py"), "--expected-world-size", "2", "--workdir", workdir,
                 "--cases", ",".join(CASES))
    assert res.returncode == 0, res.stdout[-6000:]
    return torch.load(os.path.join(workdir, "results.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1-process references, computed lazily in this process."""
    workdir = str(tmp_path_factory.mktemp("single"))
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = ddp_cases.run_case(name, 1, workdir)
        return cache[name]

    return get


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_contract(r: dict) -> None:
    """Facts every 2-process step must satisfy."""
    assert r["world"] == 2
    s = ddp_cases.case_settings(r["name"])
    # the accountant's q is the GLOBAL rate: per-device batch x GA x 2 processes / N (users / U at user level)
    assert r["sample_rate"] == pytest.approx(s["per_device"] * s["ga"] * 2 / (s["users"] or s["n"]))
    assert r["wrapped"] == "DistributedDataParallel"  # accelerate did wrap the model in DDP
    assert r["max_param_diff"] and all(d == 0.0 for d in r["max_param_diff"]), r["max_param_diff"]
    for rank in r["per_rank"]:
        assert all(rank["grad_norm_ok"]), "a rank's pre-step gradient exceeds n_local x C: not its clipped sum"
    # Ranks hold different local sums before the step (DDP would have averaged them into equal ones).
    steps_both_busy = [i for i in range(len(r["grads_differ"]))
                       if all(rank["local_examples"][i] > 0 for rank in r["per_rank"])]
    assert steps_both_busy and all(r["grads_differ"][i] for i in steps_both_busy)
    # One global Poisson draw: every rank uses the same sampling seed (rank 0's, broadcast, unless fixed).
    assert len({rank["sampler_seed"] for rank in r["per_rank"]}) == 1
    # Same number of micro-batches on every rank (GA per step).
    assert len({rank["micro_batches"] for rank in r["per_rank"]}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_processes_match_one_process_without_noise(ddp, single, name):
    r2, r1 = ddp[name], single(name)
    _assert_contract(r2)
    assert r2["sample_rate"] == r1["sample_rate"] and r2["expected_batch_size"] == r1["expected_batch_size"]
    # same global Poisson draws: the per-step global batch sizes agree
    global2 = [sum(x) for x in zip(*(rank["local_examples"] for rank in r2["per_rank"]))]
    assert global2 == r1["per_rank"][0]["local_examples"]
    moved = max(float(d.abs().max()) for d in r1["delta"].values())
    assert moved > 1e-3  # training really changed the parameters
    assert _max_diff(r2["params"], r1["params"]) < 1e-5


@pytest.mark.slow
def test_user_level_two_processes_match_one_process(ddp, single):
    """Users (never split) dealt to ranks: the 2-process user-level LoRA run gives the 1-process weights."""
    r2, r1 = ddp["users"], single("users")
    _assert_contract(r2)
    assert r2["sample_rate"] == r1["sample_rate"] == 8 / 16  # users per step / users, not rows
    global2 = [sum(x) for x in zip(*(rank["local_examples"] for rank in r2["per_rank"]))]
    assert global2 == r1["per_rank"][0]["local_examples"]  # same rows per step (same user draw, same caps)
    assert all(n % 3 == 0 for n in global2)  # every sampled user contributes exactly 3 of their 4 rows
    assert max(float(d.abs().max()) for d in r1["delta"].values()) > 1e-3
    assert _max_diff(r2["params"], r1["params"]) < 1e-5


@pytest.mark.slow
def test_two_processes_with_the_same_noise_seed_match_one_process(ddp, single):
    r2, r1 = ddp["noisy"], single("noisy")
    _assert_contract(r2)
    assert _max_diff(r2["params"], r1["params"]) < 1e-5


@pytest.mark.slow
def test_noise_variance_two_processes_equals_one_process(ddp, single):
    """Pure-noise SGD step (sigma = 1000, lr 1): per-coordinate variance (sigma C / B_exp)^2, noise added once.

    Statistical: with d ~ 27k coordinates the estimate's relative std is sqrt(2/d) ~ 0.9%; the bound below is
    6 of those, while adding the noise on both ranks doubles the variance and splitting it halves it.
    """
    variances = {}
    for world, r in ((2, ddp["variance"]), (1, single("variance"))):
        d = torch.cat([x.flatten().double() for x in r["delta"].values()])
        expected = (r["noise_std"] * r["lr"] / r["expected_batch_size"]) ** 2
        # the clipped signal is at most B C per step, i.e. < 1e-6 of the noise energy here
        variances[world] = float(d.pow(2).mean()) / expected
        tol = 6 * math.sqrt(2 / d.numel())
        assert abs(variances[world] - 1) < tol, (world, variances[world], tol)
    _assert_contract(ddp["variance"])
    assert abs(variances[2] / variances[1] - 1) < 6 * math.sqrt(4 / d.numel())


@pytest.mark.slow
def test_resumed_two_process_run_keeps_its_spent_budget(ddp):
    r = ddp["resume"]
    _assert_contract(r)
    assert r["uninterrupted_steps"] == 4 and r["resumed_steps"] == 4 and r["resumed_global_step"] == 4
    assert r["resumed"] == r["uninterrupted"]  # the (q, sigma, steps) history, all runs composed
    assert r["resumed_epsilon"] == pytest.approx(r["uninterrupted_epsilon"], rel=1e-9)
    assert r["resumed_param_diff"] and all(d == 0.0 for d in r["resumed_param_diff"])
    # the checkpoint holds neither the noise seed nor the sampling seed (checkpoints get published)
    assert r["secret_seeds_in_checkpoint"] == []


@pytest.mark.slow
def test_empty_slices_do_not_hang_and_epochs_redraw(ddp):
    r = ddp["empty"]
    _assert_contract(r)
    assert r["steps"] == 80 and r["global_step"] == 80  # every step accounted, empty ones included
    ranks = r["per_rank"]
    assert all(rank["micro_batches"] == 80 * 2 for rank in ranks)
    assert all(rank["empty_micro_batches"] > 0 for rank in ranks)
    # at least one step where a whole rank slice was empty while the other rank had examples
    assert any(min(a, b) == 0 < max(a, b) for a, b in zip(ranks[0]["local_examples"], ranks[1]["local_examples"]))
    # epoch 2 is a fresh Poisson draw, not a replay of epoch 1
    assert ranks[0]["local_examples"][:40] != ranks[0]["local_examples"][40:]


@pytest.mark.slow
def test_copyable_example_runs_on_two_cpu_processes_from_the_config_file(tmp_path):
    """The command shown in docs/distributed.md, with the CPU config file: 2 processes, a DP run, a certified epsilon."""
    root = os.path.dirname(HERE)
    out = tmp_path / "dp-ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(root, "examples", "accelerate", "cpu_2proc.yaml"), "--main_process_port", "0",
        os.path.join(root, "examples", "accelerate", "dp_finetune.py"), "--smoke", "--output-dir", str(out),
        "--batch-size", "32", "--micro-batch-size", "8", "--max-steps", "3", "--noise-multiplier", "1.0",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert "processes: 2;" in res.stdout
    assert "steps: 3; certified epsilon" in res.stdout
    assert (out / "_privacy_state.json").is_file()


@pytest.mark.slow
def test_main_job_cli_under_two_processes_reports_and_writes_once(tmp_path):
    """``accelerate launch -m hf_ewtune.cli train``: rank 0 alone prints the results and writes the run's files."""
    out = tmp_path / "main-job"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "hf_ewtune.cli", "train", "--smoke", "--pooling", "mean", "--output-dir", str(out), "--no-progress",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert res.stdout.count("== results ==") == 1 and res.stdout.count("certified ε =") == 1
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["main_process"] is True and 0 < results["epsilon"] <= 3.0 + 1e-6
    card = (out / "README.md").read_text()
    assert card.count("## How to load") == 1 and "world_size: 2" in card
