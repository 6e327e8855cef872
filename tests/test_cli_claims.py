"""What ``hf-ewtune train / sft / audit`` print before training names a target epsilon only when one is enforced,
and the SFT recipe refuses a batch size its micro-batches cannot make up (it would shrink q silently)."""

from __future__ import annotations

import pytest

from hf_ewtune.cli import main
from hf_ewtune.recipes.training import PrivacySettings, enforced_target, privacy_headline


def _stop(**_kw):
    raise ValueError("stopped by the test")


@pytest.mark.parametrize("command, target", [
    (["train", "--smoke"], "hf_ewtune.recipes.run_text_classification"),
    (["sft", "--smoke"], "hf_ewtune.recipes.sft.run_sft"),
    (["audit", "--smoke"], "hf_ewtune.audit.recipe.audit_text_classification"),
])
def test_fixed_noise_runs_do_not_announce_a_target_epsilon(tmp_path, monkeypatch, capsys, command, target):
    if command[0] == "sft":
        pytest.importorskip("trl")
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(module + "." + name, _stop)
    assert main([*command, "--output-dir", str(tmp_path), "--noise-multiplier", "0.7"]) == 2
    out = capsys.readouterr().out
    assert "fixed noise multiplier σ = 0.7, no target ε" in out and "target ε =" not in out
    assert main([*command, "--output-dir", str(tmp_path), "--target-epsilon", "2"]) == 2
    assert "target ε = 2, certified" in capsys.readouterr().out


def test_results_record_no_target_for_fixed_noise():
    assert enforced_target(PrivacySettings(target_epsilon=8.0, noise_multiplier=0.7)) is None
    assert enforced_target(PrivacySettings(target_epsilon=8.0)) == 8.0
    assert privacy_headline(PrivacySettings(private=False)) == "non-private baseline"


def test_sft_refuses_a_batch_its_micro_batches_cannot_make_up(tmp_path):
    pytest.importorskip("trl")
    from hf_ewtune.recipes.sft import SFTRecipeConfig, run_sft

    with pytest.raises(ValueError, match="batch_size=16 must be a multiple of micro_batch_size=6"):
        run_sft(config=SFTRecipeConfig(output_dir=str(tmp_path), smoke=True, batch_size=16, micro_batch_size=6))


def test_card_command_does_not_call_an_uncertified_epsilon_certified(tmp_path, monkeypatch, capsys):
    import hf_ewtune.model_card as model_card
    from hf_ewtune.accounting import PLDAccountant

    acc = PLDAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    old = {"accountant": {"name": "pld", "state": acc.state_dict()}, "delta": 1e-5, "poisson_sampling": False,
           "steps": 10}  # shuffled batches accounted as if Poisson (states from before the shuffled bound)
    monkeypatch.setattr(model_card, "load_state", lambda _dir: old)
    assert main(["card", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "certified epsilon =" not in out and "epsilon (NOT certified" in out
