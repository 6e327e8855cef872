"""The chunked in-place noise draw: same noise as one torch.normal draw, i.i.d. N(0, std^2) across chunks,
float32 arithmetic for bf16 gradients, and DPOptimizer's variance through it."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hf_ewtune.noise import DPOptimizer
from hf_ewtune.noise_draw import NOISE_CHUNK, add_gaussian_noise_, chunk_bounds

SIZES = [1, 15, 16, 17, 63, 64, 65, 64 + 15, 64 + 16, 3 * 64 + 7, 5 * 64]


@pytest.mark.parametrize("n", SIZES)
def test_chunk_bounds_cover_the_range_with_no_short_last_piece(n):
    bounds = chunk_bounds(n, 64)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert all(stop - start == 64 for start, stop in bounds[:-1])
    assert len(bounds) == 1 or bounds[-1][1] - bounds[-1][0] >= 16


def test_chunk_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        chunk_bounds(100, 40)
    assert NOISE_CHUNK % 16 == 0 and NOISE_CHUNK < 32768  # below ATen's grain: the add runs on one thread


@pytest.mark.parametrize("n", SIZES + [NOISE_CHUNK + 5, 2 * NOISE_CHUNK + 16])
@pytest.mark.parametrize("chunk", [64, NOISE_CHUNK])
def test_chunked_draw_equals_the_one_shot_torch_normal_draw(n, chunk):
    """Bit for bit the noise the previous per-parameter ``torch.normal`` drew from the same generator state."""
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3))
    expected = grad + torch.normal(0.0, 0.7, size=(n,), generator=torch.Generator().manual_seed(9))
    got = grad.clone()
    add_gaussian_noise_(got, std=0.7, generator=torch.Generator().manual_seed(9), chunk=chunk)
    assert torch.equal(got, expected)
    divided = grad.clone()
    add_gaussian_noise_(divided, std=0.7, generator=torch.Generator().manual_seed(9), divide_by=4.0, chunk=chunk)
    assert torch.equal(divided, expected / 4.0)


def test_chunks_are_fresh_independent_draws():
    """A bug that reseeded (or reused the buffer without redrawing) per chunk would repeat the noise."""
    chunk = 1024
    t = torch.zeros(8 * chunk)
    add_gaussian_noise_(t, std=1.0, generator=torch.Generator().manual_seed(0), chunk=chunk)
    pieces = t.view(8, chunk)
    corr = torch.corrcoef(pieces.double())
    off_diag = corr[~torch.eye(8, dtype=torch.bool)]
    assert off_diag.abs().max() < 6 / math.sqrt(chunk)  # pairwise correlations ~ 0 (sd 1/32)
    assert stats.kstest(t.numpy(), "norm").pvalue > 1e-6


def test_non_contiguous_gradient_gets_the_one_shot_draw():
    grad = torch.zeros(64, 48).t()  # [48, 64], not contiguous
    add_gaussian_noise_(grad, std=2.0, generator=torch.Generator().manual_seed(5), chunk=64)
    expected = torch.normal(0.0, 2.0, size=(48, 64), generator=torch.Generator().manual_seed(5))
    assert torch.equal(grad, expected)


def test_bf16_gradient_gets_float32_noise_rounded_once():
    n = 3 * NOISE_CHUNK + 100
    grad32 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    grad = grad32.to(torch.bfloat16)
    add_gaussian_noise_(grad, std=0.3, generator=torch.Generator().manual_seed(2))
    noise = torch.normal(0.0, 0.3, size=(n,), generator=torch.Generator().manual_seed(2))
    assert grad.dtype == torch.bfloat16
    assert torch.equal(grad, (grad32.to(torch.bfloat16).float() + noise).to(torch.bfloat16))


def test_dp_optimizer_variance_of_a_bf16_parameter_over_many_chunks():
    sigma, c, b = 1.3, 0.7, 5.0
    d = 6 * NOISE_CHUNK + 1000
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.bfloat16))
    opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma, sensitivity=c, expected_batch_size=b,
                      noise_seed=17)
    p.grad = torch.zeros_like(p)
    opt.step()
    upd = -p.detach().double()
    var = (sigma * c / b) ** 2
    stat = (upd ** 2).sum().item() / var
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], d)
    # bf16 rounding of N(0, var) values adds a relative variance of ~2^-16 (far inside the interval's width).
    assert lo < stat < hi
    assert not lo < (upd ** 2).sum().item() / (sigma * c) ** 2 < hi  # undivided noise is rejected


def test_dp_optimizer_noise_is_unchanged_from_the_per_parameter_draw():
    """Same seed, same step: the update equals the previous implementation's (torch.normal per parameter)."""
    shapes = [(3, 5), (NOISE_CHUNK + 40,), (7,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, sensitivity=2.0, expected_batch_size=4.0,
                      noise_seed=123)
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    gen = opt._generator(torch.device("cpu"), 0)  # the step's generator, as add_noise_and_scale seeds it
    expected = [(g + torch.normal(0.0, 2.0, size=g.shape, generator=gen)) / 4.0 for g in grads]
    opt.step()
    for p, e in zip(params, expected):
        assert torch.equal(-p.detach(), e)


# ---- large tensors: segments with their own generators, drawn in parallel threads -----------------------------
from hf_ewtune.noise_draw import SEGMENT_MIN, segment_bounds  # noqa: E402


def test_segments_cover_large_tensors_and_depend_on_size_only():
    assert segment_bounds(SEGMENT_MIN - 1) == [(0, SEGMENT_MIN - 1)]
    for n in (SEGMENT_MIN, SEGMENT_MIN + 7, 40 * 2**20 + 3):
        seg = segment_bounds(n)
        assert seg[0][0] == 0 and seg[-1][1] == n and all(a[1] == b[0] for a, b in zip(seg, seg[1:]))
        assert 2 <= len(seg) <= 16


def test_segmented_noise_does_not_depend_on_the_thread_count():
    n = SEGMENT_MIN + 1000
    threads = torch.get_num_threads()
    out = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            t = torch.zeros(n)
            add_gaussian_noise_(t, std=1.5, generator=torch.Generator().manual_seed(4), divide_by=3.0)
            out.append(t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_segmented_noise_is_iid_with_the_exact_variance_and_fresh_per_call():
    n = 3 * 2**20 + 5  # three segments
    gen = torch.Generator().manual_seed(8)
    t = torch.zeros(n)
    add_gaussian_noise_(t, std=0.6, generator=gen, divide_by=2.0)
    x = (t.double() * 2.0 / 0.6)  # N(0, 1) if the variance is exactly (0.6 / 2)^2
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], n)
    assert lo < float((x ** 2).sum()) < hi
    assert stats.kstest(x[:200_000].numpy(), "norm").pvalue > 1e-6
    segs = [x[a:b][:2**20] for a, b in segment_bounds(n)]
    assert len(segs) == 3
    corr = torch.corrcoef(torch.stack(segs))
    assert corr[~torch.eye(3, dtype=torch.bool)].abs().max() < 6 / math.sqrt(2**20)  # independent streams
    again = torch.zeros(n)
    add_gaussian_noise_(again, std=0.6, generator=gen, divide_by=2.0)  # the generator moved on: fresh noise
    assert abs(float(torch.corrcoef(torch.stack([t, again]))[0, 1])) < 6 / math.sqrt(n)
