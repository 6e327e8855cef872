"""Accountant queries stay bounded in time and memory; out-of-range inputs fail fast, before training.

Inputs that used to pass validation and then hang or crash (issue 11, item 7) each get a test. Cases that
used to hang or allocate tens of GiB run in a subprocess with a timeout and an address-space limit, so
that a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from hf_ewtune import cli
from hf_ewtune.accounting import PLDAccountant, accountant_from_state, calibrate, steps_within_budget
from hf_ewtune.errors import PrivacyConfigError, PrivacyStateError
from hf_ewtune.privacy_state import PRIVACY_STATE_NAME, load_privacy_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_bounded(code: str, *, seconds: float = 120.0, memory_gib: float = 3.0) -> dict:
    """Run ``code`` in a fresh interpreter limited to ``memory_gib`` of address space; it prints one JSON line."""
    prelude = (
        "import resource, json\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(memory_gib * 2**30)}, {int(memory_gib * 2**30)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=seconds, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the accountant query did not finish within {seconds:.0f} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- out-of-range inputs fail fast
@pytest.mark.parametrize("sigma", [1e-3, 1e308])
def test_noise_multiplier_outside_supported_range_is_rejected_by_step(sigma):
    with pytest.raises(PrivacyConfigError, match=r"noise_multiplier=.*supported range"):
        PLDAccountant().step(noise_multiplier=sigma, sample_rate=0.01, num_steps=100)


def test_sample_rate_1e_300_is_rejected_naming_the_range():
    with pytest.raises(PrivacyConfigError, match=r"sample_rate=1e-300 is below the supported range"):
        calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=1e-300, steps=100)


def test_target_epsilon_200_is_rejected_by_calibrate_and_steps_within_budget():
    with pytest.raises(PrivacyConfigError, match=r"target_epsilon=200.* \(0, 100\]"):
        calibrate(target_epsilon=200.0, delta=1e-6, sample_rate=256 / 11476, steps=90)
    with pytest.raises(PrivacyConfigError, match=r"target_epsilon=200"):
        steps_within_budget(noise_multiplier=1.0, sample_rate=0.01, target_epsilon=200.0, delta=1e-5)


def test_steps_above_maximum_are_rejected():
    with pytest.raises(PrivacyConfigError, match=r"steps=100000000000 is above the supported maximum"):
        calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=10**11)


def _cli_bounded(*argv: str) -> dict:
    """``hf-ewtune ARGV`` in a bounded subprocess: its exit status and stderr (these inputs used to hang)."""
    return _run_bounded(f"""
        import contextlib, io
        from hf_ewtune import cli
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main({list(argv)!r})
        print(json.dumps({{"rc": rc, "err": err.getvalue()}}))
    """, seconds=60)


def test_cli_calibrate_steps_1e11_exits_2_naming_the_flag():
    out = _cli_bounded("calibrate", "--target-epsilon", "3", "--sample-rate", "0.01", "--steps", "100000000000")
    assert out["rc"] == 2 and "--steps" in out["err"] and "1e+09" in out["err"]


def test_cli_sample_rate_1e_300_exits_2_naming_the_flag(capsys):
    assert cli.main(["calibrate", "--target-epsilon", "3", "--sample-rate", "1e-300", "--steps", "100"]) == 2
    err = capsys.readouterr().err
    assert "--sample-rate" in err and "Traceback" not in err


def test_cli_target_epsilon_200_exits_2(capsys):
    assert cli.main(["calibrate", "--target-epsilon", "200", "--sample-rate", "0.02", "--steps", "90"]) == 2
    assert "--target-epsilon" in capsys.readouterr().err


def test_cli_noise_multiplier_1e_3_exits_2():
    out = _cli_bounded("epsilon", "--noise-multiplier", "1e-3", "--sample-rate", "0.01", "--steps", "100")
    assert out["rc"] == 2 and "--noise-multiplier" in out["err"]


# ---------------------------------------------------------------------- in-range queries are bounded
def test_cli_calibrate_target_200_used_to_spin_now_answers_fast():
    out = _run_bounded("""
        from hf_ewtune import cli
        print(json.dumps({"rc": cli.main(["calibrate", "--target-epsilon", "200", "--sample-rate", "0.0223",
                                          "--steps", "90", "--delta", "1e-6"])}))
    """, seconds=60)
    assert out["rc"] == 2


def test_tiny_noise_query_stays_in_memory_and_names_the_fallback():
    # sigma = 0.01 with q = 1e-3 needs ~6e9 PLD grid points at 1e-4 (tens of GiB): RDP certifies instead.
    out = _run_bounded("""
        from hf_ewtune.accounting import PLDAccountant
        acc = PLDAccountant()
        acc.step(noise_multiplier=0.01, sample_rate=1e-3, num_steps=10000)
        r = acc.get_privacy_spent(delta=1e-5)
        print(json.dumps({"eps": r.epsilon, "by": r.certified_by}))
    """, seconds=90, memory_gib=3.0)
    assert math.isfinite(out["eps"]) and out["eps"] > 100
    assert "RDP" in out["by"] and "fallback" in out["by"] and "grid points" in out["by"]


def test_very_long_run_query_is_bounded_and_certified_by_rdp():
    out = _run_bounded("""
        from hf_ewtune.accounting import EdgeworthAccountant
        acc = EdgeworthAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10**9)
        r = acc.get_privacy_spent(delta=1e-5)
        print(json.dumps({"eps": r.epsilon, "by": r.certified_by}))
    """, seconds=90)
    assert out["eps"] > 1000 and "RDP" in out["by"] and "fallback" in out["by"]


def test_bounded_pld_is_unchanged_in_the_usual_regime():
    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    report = acc.get_privacy_spent(delta=1e-5)
    assert round(report.epsilon, 2) == 1.83
    assert report.certified_by.endswith("value discretization 1e-4)")


def test_coarser_grid_is_still_an_upper_bound():
    from hf_ewtune.accounting.certified import pld_epsilon_unbounded

    history = [(1.0, 0.01, 1000)]
    fine = pld_epsilon_unbounded(history, 1e-5, value_discretization_interval=1e-4)
    coarse = pld_epsilon_unbounded(history, 1e-5, value_discretization_interval=1e-2)
    assert coarse >= fine


# --------------------------------------------------------------------------------- privacy states
def test_state_with_200_segments_is_refused_on_load():
    state = PLDAccountant().state_dict()
    state["history"] = [[1.0 + i / 1000, 0.01, 10] for i in range(200)]
    with pytest.raises(PrivacyStateError, match="200 segments; at most 32"):
        accountant_from_state(state)


def test_accountant_refuses_a_33rd_segment():
    acc = PLDAccountant()
    for i in range(32):
        acc.step(noise_multiplier=1.0 + i / 100, sample_rate=0.01)
    with pytest.raises(PrivacyConfigError, match="32 segments"):
        acc.step(noise_multiplier=2.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.31, sample_rate=0.01)  # the same setting as the last segment still merges
    assert acc.steps == 33


def test_oversized_privacy_state_file_is_refused_before_parsing(tmp_path):
    with open(tmp_path / PRIVACY_STATE_NAME, "w") as fh:
        fh.write('{"steps": 1, "pad": "' + "x" * (5 * 2**20) + '"}')
    with pytest.raises(PrivacyStateError, match="bytes"):
        load_privacy_state(str(tmp_path))


# ------------------------------------------------------------------- cost per optimizer step (issue 15.3)
def test_step_end_never_computes_epsilon_and_state_stays_constant_size():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_ewtune.accounting import make_accountant
    from hf_ewtune.callbacks import PrivacyCallback

    acc = make_accountant("pld")
    queries = []
    for name in ("get_epsilon", "get_privacy_spent"):
        original = getattr(acc, name)
        setattr(acc, name, lambda *a, _o=original, _n=name, **k: (queries.append(_n), _o(*a, **k))[1])
    from hf_ewtune.dp_settings import DPSettings

    settings = DPSettings(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=10, max_grad_norm=1.0,
                          sensitivity=1.0, delta=1e-5)
    callback = PrivacyCallback(accountant=acc, accountant_name="pld", settings=settings, target_epsilon=3.0,
                               budget_steps=5000)
    args = TrainingArguments(output_dir="/tmp/hf_ewtune_unused", report_to="none", save_strategy="no", use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    for i in range(5000):
        state.global_step = i + 1
        callback.on_step_end(args, state, control)
    assert queries == [] and acc.history == [(1.0, 0.01, 5000)]  # O(1) per step, whatever the run length
    assert control.should_training_stop  # the certified budget (precomputed) is still enforced
    logs: dict = {}
    callback.on_log(args, state, control, logs=logs)
    assert queries and logs["epsilon"] > 0  # only logging computes a certified epsilon


def test_ensure_room_refuses_before_a_run_that_would_open_a_33rd_segment():
    from hf_ewtune.accounting import ShuffledAccountant

    acc = ShuffledAccountant(steps_per_epoch=10)
    for _ in range(32):
        acc.start_run()
        acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=3)
    acc.ensure_room(noise_multiplier=1.0, sample_rate=0.1)  # the current run may go on
    acc.start_run()
    with pytest.raises(PrivacyConfigError, match="32 segments"):
        acc.ensure_room(noise_multiplier=1.0, sample_rate=0.1)  # a 33rd resume: refused before it trains
