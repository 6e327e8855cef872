"""The audit of a 2-process run (DDP over gloo on CPU, ``accelerate launch``) catches noise that reaches one rank only.

One launch (``tests/ddp/audit_two_processes.py``, ~1 min) audits, with the settings of test_audit_mechanism.py
(claimed epsilon = 1, 1000 gradient canaries, 10 steps of expected batch 100 = 2 x 50, seeded):

* the real DPTrainer: rank 0 adds the noise once, then the sums are all-reduced; every replica releases the
  same noisy gradient, and the lower bound stays below the certified epsilon;
* the bug (``audit_helpers.NoiseAfterReduceOnRankZeroTrainer``): all-reduce first, then noise on rank 0
  only. Rank 0's replica is exactly as noisy as it should be (auditing it alone finds nothing); rank 1's
  is noise-free. The audit gathers every rank's canary scores, sees the replicas diverge, audits each one
  (Bonferroni over the 2) and the bound exceeds the claim.
"""

from __future__ import annotations

import json
import os

import pytest

from audit_helpers import CLAIMED_EPSILON
from test_distributed import DDP_DIR, launch


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("audit2"))
    res = launch(os.path.join(DDP_DIR, "audit_two_processes.py"), "--expected-world-size", "2", "--workdir", workdir,
                 "--mechanisms", "real,rank0-noise")
    assert res.returncode == 0, res.stdout[-6000:]
    with open(os.path.join(workdir, "reports.json")) as f:
        return json.load(f), res.stdout


def _assert_two_processes(result: dict) -> None:
    report, ranks = result["report"], result["ranks"]
    assert report["num_processes"] == 2 and [r["world"] for r in ranks] == [2, 2]
    assert report["kind"] == "gradient" and report["num_canaries"] == 1000 and report["steps"] == 10
    assert report["certified_epsilon"] <= CLAIMED_EPSILON
    # every rank computed the same report from the gathered scores (rank 0 alone writes it)
    assert len({(r["certified_epsilon"], r["epsilon_lower"], r["replicas_agree"]) for r in ranks}) == 1
    assert result["wrote_files"] == []  # nothing trained with canaries reaches the disk


@pytest.mark.slow
def test_real_two_process_mechanism_stays_below_the_certified_epsilon(audits):
    results, _ = audits
    real = results["real"]
    _assert_two_processes(real)
    report = real["report"]
    assert report["replicas_agree"] is True  # noise added before the all-reduce: one noisy gradient everywhere
    assert report["epsilon_lower"] < report["certified_epsilon"] and report["violation"] is False


@pytest.mark.slow
def test_noise_on_rank_zero_only_after_the_all_reduce_is_caught(audits):
    results, stdout = audits
    broken = results["rank0-noise"]
    _assert_two_processes(broken)
    report = broken["report"]
    assert report["replicas_agree"] is False  # rank 1's replica trained on noise-free gradients
    assert report["violation"] is True and report["epsilon_lower"] > 3 * CLAIMED_EPSILON
    assert "PRIVACY VIOLATION" in stdout and "REPLICAS DIVERGED" in stdout
