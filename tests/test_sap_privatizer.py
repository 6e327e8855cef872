"""d_chi sampler statistics (seeded, statistical), regressions against known public-code bugs, caching and CTI."""

import math

import pytest
import torch
from scipy import stats

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sap import CTIAllocator, DChiPrivatizer, eta_for_relative_noise, nn_inversion, sample_dchi_noise
from hf_ewtune.sap.privatizers import dchi_log_density


pytestmark = pytest.mark.usefixtures("one_torch_thread")


N = 20_000


@pytest.mark.parametrize("d,eta", [(64, 100.0), (768, 100.0), (16, 2.0)])
def test_radius_distribution(d, eta):
    z = sample_dchi_noise((N, d), eta, generator=torch.Generator().manual_seed(0))
    r = z.double().norm(dim=-1)
    sd_theory = math.sqrt(d) / eta
    assert abs(float(r.mean()) - d / eta) < 4 * sd_theory / math.sqrt(N)
    assert abs(float(r.std()) / sd_theory - 1) < 0.05
    # the radius is Gamma(shape d, RATE eta), i.e. scale 1/eta
    assert stats.kstest(r.numpy(), stats.gamma(a=d, scale=1 / eta).cdf).pvalue > 1e-3


def test_direction_is_uniform_on_sphere():
    d = 16
    z = sample_dchi_noise((N, d), 3.0, generator=torch.Generator().manual_seed(1)).double()
    u = z / z.norm(dim=-1, keepdim=True)
    assert float(u.mean(0).abs().max()) < 4 / math.sqrt(N * d) * 2
    second = u.T @ u / N
    assert float((second - torch.eye(d) / d).abs().max()) < 5e-3


def test_regression_rate_not_scale():
    # Gamma(d, rate=eta): mean d/eta = 0.64 at d=64, eta=100 -- NOT d*eta = 6400 (rate/scale mix-up)
    z = DChiPrivatizer(eta=100.0, seed=0)(torch.zeros(10, 100, 64))
    mean = float(z.norm(dim=-1).mean())
    assert 0.62 < mean < 0.66


def test_regression_one_radius_per_token_not_per_batch_or_element():
    d, eta = 64, 100.0
    z = DChiPrivatizer(eta=eta, seed=0)(torch.zeros(1, 4000, d))[0]
    r = z.norm(dim=-1)
    # one radius per token: the across-token sd of ||z|| is sqrt(d)/eta (a per-batch radius gives ~0)
    assert abs(float(r.std()) / (math.sqrt(d) / eta) - 1) < 0.1
    # per-element Gamma x Uniform[-1, 1] (SnD bug) gives ||z|| ~ sqrt(d/3) d/eta, i.e. 4.6x too large at d=64
    assert float(r.mean()) < 1.1 * d / eta
    # the direction is isotropic: coordinates are not all of one magnitude (uniform-per-element bug)
    assert float((z / r.unsqueeze(-1)).abs().max()) > 0.4


def test_log_density_normalisation_and_dchi_bound():
    d, eta = 8, 3.0
    r = torch.linspace(0.1, 10, 50, dtype=torch.float64)
    z = torch.zeros(50, d, dtype=torch.float64)
    z[:, 0] = r
    # density of the radius = p(z) * surface area of the sphere of radius r  ->  Gamma(d, rate=eta)
    log_area = math.log(2) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2) + (d - 1) * torch.log(r)
    lhs = dchi_log_density(z, eta=eta) + log_area
    rhs = torch.distributions.Gamma(torch.tensor(float(d), dtype=torch.float64),
                                    torch.tensor(eta, dtype=torch.float64)).log_prob(r)
    torch.testing.assert_close(lhs, rhs)
    g = torch.Generator().manual_seed(3)
    x, x2, y = (torch.randn(500, d, generator=g, dtype=torch.float64) for _ in range(3))
    ratio = dchi_log_density(y - x, eta=eta) - dchi_log_density(y - x2, eta=eta)
    assert bool((ratio <= eta * (x - x2).norm(dim=-1) + 1e-9).all())


def test_padding_untouched_and_infinite_eta_means_no_noise():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = DChiPrivatizer(eta=1.0, seed=0)(h, attention_mask=mask)
    assert torch.equal(out[0, 3:], h[0, 3:])
    assert bool((out[0, :3] != h[0, :3]).any(-1).all())
    token_eta = torch.full((2, 5), 1.0)
    token_eta[1, 2] = math.inf
    out = DChiPrivatizer(eta=1.0, seed=0)(h, attention_mask=mask, token_eta=token_eta)
    assert torch.equal(out[1, 2], h[1, 2]) and not torch.equal(out[1, 1], h[1, 1])


def test_seeded_reproducible_and_global_rng_untouched():
    h = torch.zeros(2, 3, 8)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = DChiPrivatizer(eta=5.0, seed=7)(h)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = DChiPrivatizer(eta=5.0, seed=7)(h)
    c = DChiPrivatizer(eta=5.0, seed=8)(h)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caching_gives_identical_representations_across_epochs():
    priv = DChiPrivatizer(eta=10.0, seed=0)
    h = torch.randn(4, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 4:] = 0
    epoch1 = priv(h, attention_mask=mask, example_ids=[0, 1, 2, 3])
    epoch2 = priv(h[[2, 0]], attention_mask=mask[[2, 0]], example_ids=[2, 0])  # other batching, same ids
    assert torch.equal(epoch2, epoch1[[2, 0]])
    g = priv.guarantee()
    assert g.draws_per_example == 1 and g.effective_eta == 10.0 and g.cached


def test_no_cache_redraws_reports_T_eta_and_averaging_helps_the_attacker():
    torch.manual_seed(0)
    table = torch.randn(1000, 64) * 0.02
    ids = torch.randint(0, 1000, (20, 100))
    h = table[ids]
    priv = DChiPrivatizer(eta=64 / (2.0 * 0.17), cache_per_example=False, seed=0)  # rho ~ 2 (E||z|| / nn dist)
    copies = [priv(h, example_ids=range(20)) for _ in range(10)]
    assert not torch.equal(copies[0], copies[1])
    g = priv.guarantee()
    assert g.draws_per_example == 10 and g.effective_eta == pytest.approx(10 * priv.eta) and "10 * eta_max" in g.note
    one = nn_inversion(copies[0], table, token_ids=ids)["top1"]
    avg = nn_inversion(torch.stack(copies).mean(0), table, token_ids=ids)["top1"]
    assert avg > one + 0.2


def test_eta_for_relative_noise():
    eta = eta_for_relative_noise(alpha=0.5, mean_norm=28.0, d=768)
    assert eta == pytest.approx(768 / 14.0)
    z = sample_dchi_noise((5000, 768), eta, generator=torch.Generator().manual_seed(0))
    assert float(z.norm(dim=-1).mean()) == pytest.approx(14.0, rel=0.01)
    with pytest.raises(PrivacyConfigError, match="alpha"):
        eta_for_relative_noise(alpha=0.0, mean_norm=1.0, d=3)


@pytest.mark.parametrize("bad", [0, -1.0, "1"])
def test_bad_eta(bad):
    with pytest.raises(PrivacyConfigError, match="eta"):
        DChiPrivatizer(eta=bad)


def _cti_corpus():
    # token 1 = A (class 0 only), 2 = B (class 1 only), 3 = C (uniform), 4 = filler
    docs, labels = [], []
    for i in range(40):
        docs.append([1, 1, 3, 4] if i % 2 == 0 else [2, 2, 3, 4])
        labels.append(i % 2)
    return docs, labels


def test_cti_linear_formula():
    docs, labels = _cti_corpus()
    cti = CTIAllocator(eta_base=100.0).fit(docs, labels, vocab_size=6)
    ui = cti.ui
    # class 0 has N_0 = 80 tokens, p[0, A] = 0.5, xi = 1/80: UI = ln(0.5 / (0 + 3/80)) = ln(13.33) > 1
    assert float(ui[0, 1]) == pytest.approx(math.log(0.5 / (3 / 80)))
    assert float(cti.eta_table[0, 1]) == pytest.approx(100.0 * float(ui[0, 1])) and float(cti.eta_table[0, 1]) > 100
    # C is uniform: UI = ln(0.25 / (0.25 + 3/80)) < 0 -> the floor 0.6
    assert float(cti.eta_table[0, 3]) == pytest.approx(60.0)
    assert float(cti.eta_table[1, 1]) == pytest.approx(60.0)  # A unseen in class 1 -> UI 0 -> floor
    ids = torch.tensor([[1, 2, 3]])
    train_eta = cti.token_eta(ids, labels=torch.tensor([0]))
    test_eta = cti.token_eta(ids)
    assert float(train_eta[0, 1]) == pytest.approx(60.0)
    assert float(test_eta[0, 1]) == pytest.approx(float(cti.eta_table[1, 2]))  # max over classes
    assert cti.eta_max == pytest.approx(float(cti.eta_table.max()))
    priv = DChiPrivatizer(eta=100.0, seed=0)
    priv(torch.zeros(1, 3, 4), token_eta=test_eta)
    assert priv.guarantee().eta_max == pytest.approx(float(test_eta.max()))


def test_cti_sigmoid_mapping_range():
    docs, labels = _cti_corpus()
    cti = CTIAllocator(eta_base=100.0, mapping="sigmoid").fit(docs, labels, vocab_size=6)
    assert bool((cti.eta_table > 0).all() and (cti.eta_table < 200).all())
    assert float(cti.eta_table[0, 1]) > 100 > float(cti.eta_table[1, 1])
    assert float(cti.eta_table[0, 3]) == pytest.approx(100.0, rel=0.05)


def test_cti_exempt_topk_warns_and_leaves_topk_unperturbed():
    docs, labels = _cti_corpus()
    with pytest.warns(UserWarning, match="UNPERTURBED"):
        cti = CTIAllocator(eta_base=100.0, mode="exempt_topk", exempt_fraction=0.25).fit(docs, labels, vocab_size=6)
    assert int(torch.isinf(cti.eta_table).sum(1)[0]) == 1 and bool(torch.isinf(cti.eta_table[0, 1]))
    assert bool(torch.isinf(cti.eta_table[1, 2]))
    h = torch.randn(1, 3, 4)
    out = DChiPrivatizer(eta=100.0, seed=0)(h, token_eta=cti.token_eta(torch.tensor([[1, 3, 4]]), labels=[0]))
    assert torch.equal(out[0, 0], h[0, 0]) and not torch.equal(out[0, 1], h[0, 1])
    assert math.isinf(cti.eta_max)


def test_cti_unfitted():
    with pytest.raises(PrivacyConfigError, match="fit"):
        CTIAllocator(eta_base=1.0).token_eta(torch.tensor([[1]]))
