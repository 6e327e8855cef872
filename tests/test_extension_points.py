"""Open extension points: user clipping rules, user accountants, one error listing every unsupported module."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_ewtune import PrivacyArguments
from hf_ewtune.accounting import (
    Accountant,
    accountant_from_state,
    accountant_names,
    calibrate,
    make_accountant,
    register_accountant,
    unregister_accountant,
)
from hf_ewtune.accounting.certified import rdp_description, rdp_epsilon
from hf_ewtune.clipping import ClippingEngine, Record, Rule, register_clipping_rule, unregister_clipping_rule
from hf_ewtune.clipping._base import compute_dtype
from hf_ewtune.errors import PrivacyConfigError, UnsupportedModuleError
from hf_ewtune.testing import check_per_example_gradients

PACKAGE = Path(__file__).resolve().parents[1] / "hf_ewtune"


# ------------------------------------------------------------------------------------------- clipping rules
class Gate(nn.Module):
    """A user layer: y = x * tanh(g) (elementwise gate over the last dimension)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.tanh(self.g)


class GateRule(Rule):
    name = "gate"

    def capture(self, engine, module, args, kwargs, output):
        return Record(module, self, args[0].detach(), [output]), None

    def per_example(self, rec, role):
        x, g = rec.data, rec.grads[0]
        cd = compute_dtype(x, g)
        dtanh = 1 - torch.tanh(rec.module.g.detach().to(cd)) ** 2
        return (x.to(cd) * g.to(cd)).reshape(rec.batch_size, -1, x.shape[-1]).sum(1) * dtanh


class WrongGateRule(GateRule):
    def per_example(self, rec, role):
        return super().per_example(rec, role) * 1.5  # a 50% error the oracle must catch


def _gated_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), Gate(5), nn.Tanh(), nn.Linear(5, 1))


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).squeeze(-1).mean(-1) if batch["x"].dim() == 3 else \
        ((model(batch["x"]) - batch["y"]) ** 2).squeeze(-1)


@pytest.fixture
def gate_rule():
    register_clipping_rule(Gate, GateRule())
    yield
    unregister_clipping_rule(Gate)


def test_registered_rule_is_used_and_matches_the_oracle(gate_rule):
    batch = {"x": torch.randn(6, 4), "y": torch.randn(6, 1)}
    report = check_per_example_gradients(_gated_model(), batch, _loss, max_grad_norm=0.1)
    assert report.ok and report.rules["1"] == "GateRule"
    assert report.max_abs_error < 1e-12 and report.clipped_sum_max_abs_error < 1e-12
    seq = {"x": torch.randn(3, 7, 4), "y": torch.randn(3, 7, 1)}  # [B, T, d] inputs: summed over tokens
    assert check_per_example_gradients(_gated_model(), seq, _loss, clipping="per_layer").ok


def test_a_wrong_registered_rule_is_caught_by_the_oracle():
    register_clipping_rule(Gate, WrongGateRule())
    try:
        batch = {"x": torch.randn(4, 4), "y": torch.randn(4, 1)}
        with pytest.raises(AssertionError, match=r"worst parameter '1\.g'"):
            check_per_example_gradients(_gated_model(), batch, _loss)
        report = check_per_example_gradients(_gated_model(), batch, _loss, raise_on_mismatch=False)
        assert not report.ok and report.worst_parameter == "1.g" and report.errors["0.weight"] < 1e-12
    finally:
        unregister_clipping_rule(Gate)
    model = _gated_model()
    assert type(ClippingEngine(model, max_grad_norm=1.0)._rules[model[1]]).__name__ == "FunctorchRule"  # unregistered


def test_register_clipping_rule_rejects_bad_input():
    with pytest.raises(TypeError, match="module_type"):
        register_clipping_rule("Gate", GateRule())
    with pytest.raises(TypeError, match="rule"):
        register_clipping_rule(Gate, 3)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm1d"):
        register_clipping_rule(nn.BatchNorm1d, GateRule())


def test_one_error_lists_every_unsupported_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LSTM(4, 4), nn.GRU(4, 4), nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(UnsupportedModuleError) as info:
        ClippingEngine(model, max_grad_norm=1.0)
    msg = str(info.value)
    for name in ("1 (BatchNorm1d)", "2 (LSTM)", "3 (GRU)", "4 (Embedding)"):  # old main: only the first
        assert name in msg
    assert msg.startswith("4 problems") and msg.count("BatchNorm1d") == 1


# ------------------------------------------------------------------------------------------------ accountants
class RDPAgain(Accountant):
    """A user accountant (here: dp-accounting's RDP under another name)."""

    name = "rdp_again"

    @property
    def certified_by(self):
        return "again: " + rdp_description()

    def _certified_epsilon(self, history, delta):
        return rdp_epsilon(history, delta)


@pytest.fixture
def rdp_again():
    register_accountant(RDPAgain)
    yield
    unregister_accountant("rdp_again")


def test_registered_accountant_is_read_by_arguments_calibration_state_and_cli(rdp_again, capsys):
    assert "rdp_again" in accountant_names()
    assert PrivacyArguments(target_epsilon=3.0, accountant="rdp_again").accountant == "rdp_again"
    ours = calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=200, accountant="rdp_again")
    theirs = calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=200, accountant="rdp")
    assert ours.accountant == "rdp_again" and ours.noise_multiplier == theirs.noise_multiplier
    acc = make_accountant("rdp_again")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    assert type(accountant_from_state(acc.state_dict())) is RDPAgain
    from hf_ewtune.cli import main

    assert main(["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "10",
                 "--accountant", "rdp_again"]) == 0
    assert "again: dp-accounting" in capsys.readouterr().out


def test_unknown_accountant_error_lists_registered_names(rdp_again):
    with pytest.raises(PrivacyConfigError, match=r"accountant must be one of .*'rdp_again'.*register_accountant"):
        PrivacyArguments(target_epsilon=3.0, accountant="nope")


def test_register_accountant_rejects_bad_classes_and_builtin_names():
    class Pld(RDPAgain):
        name = "pld"

    class Unnamed(RDPAgain):
        name = "Has Space"

    with pytest.raises(PrivacyConfigError, match="already registered"):
        register_accountant(Pld)
    with pytest.raises(PrivacyConfigError, match="lower-case name"):
        register_accountant(Unnamed)
    with pytest.raises(PrivacyConfigError, match="Accountant subclass"):
        register_accountant(dict)
    with pytest.raises(PrivacyConfigError, match="cannot be unregistered"):
        unregister_accountant("pld")
    assert make_accountant("pld").name == "pld"


def test_no_accountant_name_string_checks_left_in_the_package():
    # An accountant's own options (EdgeworthAccountant.certifier == "rdp") are not registry names.
    pattern = re.compile(r"""(name|accountant)\)?\s*(==|!=|in|not in)\s*\(?["'](pld|rdp|edgeworth)["']""")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_docs_extending_examples_run():
    import hf_ewtune.accounting as accounting
    from hf_ewtune import DPTrainer

    text = (PACKAGE.parent / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    namespace = {"torch": torch, "DPTrainer": DPTrainer}
    try:
        for block in blocks:
            exec(compile(block, "docs/extending.md", "exec"), namespace)
        assert "my_rdp" in accounting.accountant_names() and namespace["report"].ok
    finally:
        unregister_clipping_rule(namespace.get("Gate", Gate))
        unregister_accountant("my_rdp")
