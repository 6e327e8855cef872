"""DPOptimizer: noise variance (sigma C / B_exp)^2, public normalisation, empty batches, delegation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hf_ewtune.noise import DPOptimizer


def _update(sigma: float, c: float, b: float, d: int, *, seed: int | None = 0, grad: torch.Tensor | None = None):
    p = torch.nn.Parameter(torch.zeros(d))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma, sensitivity=c, expected_batch_size=b,
                      noise_seed=seed)
    p.grad = None if grad is None else grad.clone()
    opt.step()
    return -p.detach().clone(), opt


def test_noise_variance_matches_sigma_c_over_b():
    sigma, c, b, d = 1.3, 0.7, 5.0, 200_000
    upd, _ = _update(sigma, c, b, d, seed=11)
    expected_var = (sigma * c / b) ** 2
    # Chi-square test of the variance (mean known to be 0): sum(x^2)/var ~ chi2(d).
    stat = (upd.double() ** 2).sum().item() / expected_var
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], d)
    assert lo < stat < hi
    # The test has power: noise not divided by B (or using sqrt(B)) is rejected.
    for wrong in ((sigma * c) ** 2, (sigma * c / math.sqrt(b)) ** 2, (sigma / b) ** 2):
        wrong_stat = (upd.double() ** 2).sum().item() / wrong
        assert not lo < wrong_stat < hi
    # Mean ~ 0 and Gaussian shape.
    assert abs(upd.mean().item()) < 6 * math.sqrt(expected_var / d)
    assert stats.kstest(upd.numpy() / math.sqrt(expected_var), "norm").pvalue > 1e-6


def test_divides_by_expected_batch_not_realised_batch():
    grad = torch.tensor([3.0, -6.0, 9.0])  # a clipped SUM over however many examples were drawn
    upd, _ = _update(0.0, 1.0, 3.0, 3, grad=grad)
    assert torch.allclose(upd, grad / 3.0)


def test_empty_batch_gets_noise_only_update():
    upd, opt = _update(1.0, 1.0, 2.0, 1000, grad=None, seed=1)
    assert upd.abs().sum() > 0 and opt.steps_taken == 1
    assert 0.45 < upd.std().item() < 0.55  # sigma * C / B = 0.5 (sd of the estimate ~0.011)
    upd_zero, _ = _update(0.0, 1.0, 2.0, 10, grad=None)
    assert torch.count_nonzero(upd_zero) == 0


def test_fixed_seed_reproducible_and_steps_differ():
    a, _ = _update(1.0, 1.0, 1.0, 50, seed=5)
    b, _ = _update(1.0, 1.0, 1.0, 50, seed=5)
    c, _ = _update(1.0, 1.0, 1.0, 50, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = torch.nn.Parameter(torch.zeros(50))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=1,
                      noise_seed=5)
    opt.step()
    first = -p.detach().clone()
    opt.step()
    second = -p.detach().clone() - first
    assert not torch.allclose(first, second)  # each step draws fresh noise


def test_entropy_seed_differs_between_instances():
    a, _ = _update(1.0, 1.0, 1.0, 50, seed=None)
    b, _ = _update(1.0, 1.0, 1.0, 50, seed=None)
    assert not torch.equal(a, b)


def test_delegation_scheduler_state_dict_and_adamw():
    p = torch.nn.Parameter(torch.ones(4))
    inner = torch.optim.AdamW([p], lr=0.1)
    opt = DPOptimizer(inner, noise_multiplier=0.5, sensitivity=1.0, expected_batch_size=4, noise_seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    p.grad = torch.ones(4)
    opt.step()
    sched.step()
    assert opt.param_groups is inner.param_groups
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}  # inner optimizer only: no noise generator state
    opt.zero_grad()
    assert p.grad is None
    assert not torch.allclose(p.detach(), torch.ones(4))


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_dcp_optimizer_state_initialisation_is_not_a_noised_step(inner):
    """torch DCP's get/set_optimizer_state_dict (every FSDP2 checkpoint save and load) calls step() on zero
    gradients at lr 0 when the optimizer has no state: no noise may be drawn, no step counted, and the inner
    optimizer's state is built from the zeros (AdamW's moments zero, not noise)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    base = torch.optim.SGD(params, lr=0.5) if inner == "sgd" else torch.optim.AdamW(params, lr=0.5)
    opt = DPOptimizer(base, noise_multiplier=10.0, sensitivity=1.0, expected_batch_size=2.0, noise_seed=3)
    state = get_optimizer_state_dict(model, opt)  # runs DCP's _init_optim_state -> opt.step()
    assert opt.steps_taken == 0 and opt._counter == 0 and opt.last_step_settings is None
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)
    assert opt.param_groups[0]["lr"] == 0.5
    if inner == "adamw":  # the state DCP wanted exists, built from zeros (the old code put noise in it)
        moments = [v["exp_avg"] for v in state["state"].values()]
        assert len(moments) == 2 and all(not m.any() for m in moments)
    # a real step right after is noised and counted, with the noise of step index 0 (no seed shifted)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.steps_taken == 1 and opt._counter == 1
    assert all(bool((p != b).any()) for p, b in zip(params, before))


def test_a_real_step_with_zero_gradients_at_lr_zero_is_noised_and_counted():
    """A warm-up step (lr 0) on an empty Poisson batch (zero clipped sums) looks like DCP's call but is training:
    it must draw noise and count (the skip keys on the caller, not on the values)."""
    p = torch.nn.Parameter(torch.zeros(5))
    inner = torch.optim.AdamW([p], lr=0.0)
    opt = DPOptimizer(inner, noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=1.0, noise_seed=0)
    p.grad = torch.zeros(5)
    opt.step()
    assert opt.steps_taken == 1 and opt.last_step_settings is not None
    assert bool(inner.state[p]["exp_avg"].any())  # the noise reached the optimizer state
