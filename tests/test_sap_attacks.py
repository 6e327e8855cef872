"""Inversion attacks: NN inversion at k = 0 (thresholds from the design note) and learned inversion at k = 1."""

import pytest
import torch

from hf_ewtune.sap import DChiPrivatizer, LearnedInversion, median_nn_distance, nn_inversion, split_model
from hf_ewtune.testing import tiny_bert


pytestmark = pytest.mark.usefixtures("one_torch_thread")


V, D = 1000, 64
SPECIAL = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def setup():
    model = tiny_bert(vocab_size=V, hidden_size=D, num_layers=2).eval()
    bottom, _ = split_model(model, split_layer=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (40, 64), generator=g)  # 2560 tokens, some special (excluded from scoring)
    mask = torch.ones_like(ids)
    mask[::3, 50:] = 0
    with torch.no_grad():
        h = bottom(input_ids=ids)
    table = bottom.embedding_matrix.detach()
    return table, ids, mask, h


def _eta(table, rho):
    return D / (rho * median_nn_distance(table))


def test_median_nn_distance_matches_calibration(setup):
    table = setup[0]
    assert 0.12 < median_nn_distance(table) < 0.22  # design note: ~0.17 at d = 64, V = 1000, std 0.02


def test_no_noise_recovers_everything(setup):
    table, ids, mask, h = setup
    res = nn_inversion(h, table, token_ids=ids, attention_mask=mask, exclude_ids=SPECIAL)
    assert res["top1"] >= 0.99 and res["empirical_privacy"] <= 0.01
    assert res["n_tokens"] == int(((mask == 1) & (ids >= 5)).sum())


def test_nn_thresholds_and_monotone(setup):
    table, ids, mask, h = setup
    rates = {}
    for rho in (0.5, 1.0, 2.0, 3.0, 5.0):
        priv = DChiPrivatizer(eta=_eta(table, rho), seed=0)
        ht = priv(h, attention_mask=mask)
        rates[rho] = nn_inversion(ht, table, token_ids=ids, attention_mask=mask, exclude_ids=SPECIAL)["top1"]
    assert rates[0.5] >= 0.99
    assert rates[5.0] <= 0.15
    vals = [rates[r] for r in sorted(rates)]
    assert all(a >= b for a, b in zip(vals, vals[1:])), rates
    assert rates[2.0] < 0.9  # the noise does something in the middle of the range


def test_cosine_not_much_better_than_l2(setup):
    table, ids, mask, h = setup
    ht = DChiPrivatizer(eta=_eta(table, 2.0), seed=1)(h, attention_mask=mask)
    l2 = nn_inversion(ht, table, token_ids=ids, attention_mask=mask, exclude_ids=SPECIAL)
    cos = nn_inversion(ht, table, token_ids=ids, attention_mask=mask, exclude_ids=SPECIAL, metric="cos")
    assert cos["top1"] <= l2["top1"] + 0.05
    assert l2["top5"] >= l2["top1"]


def test_project_to_vocab_snaps_to_rows(setup):
    table, ids, mask, h = setup
    priv = DChiPrivatizer(eta=_eta(table, 1.0), seed=0, project_to_vocab=True, vocab_embeddings=table)
    ht = priv(h[:2], attention_mask=mask[:2])
    rows = ht[0, :5]
    assert bool((rows.unsqueeze(1) == table.unsqueeze(0)).all(-1).any(-1).all())


def _pairs(bottom, priv, n_batches, seed, vocab=V):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, vocab, (32, 16), generator=g)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            h = bottom(input_ids=ids, attention_mask=mask)
        out.append((priv(h, attention_mask=mask) if priv is not None else h, ids, mask))
    return out


@pytest.mark.slow
def test_learned_inversion_k1():
    torch.manual_seed(0)
    vocab = 300
    model = tiny_bert(vocab_size=vocab, hidden_size=D, num_layers=2).eval()
    bottom, _ = split_model(model, split_layer=1)
    with torch.no_grad():
        ids = torch.randint(5, vocab, (8, 16))
        norm = float(bottom(input_ids=ids).norm(dim=-1).mean())
    results = {}
    for name, alpha in (("clean", None), ("noisy", 2.0)):
        priv = None if alpha is None else DChiPrivatizer(eta=D / (alpha * norm), seed=0, cache_per_example=False)
        train = _pairs(bottom, priv, 40, seed=1, vocab=vocab)  # the attacker's public data
        test = _pairs(bottom, priv, 4, seed=2, vocab=vocab)
        att = LearnedInversion(hidden_size=D, vocab_size=vocab, width=256)
        losses = att.fit(train, epochs=8, lr=3e-3)
        assert losses[-1] < losses[0]
        h = torch.cat([t[0] for t in test])
        y = torch.cat([t[1] for t in test])
        results[name] = att.evaluate(h, token_ids=y)["top1"]
    assert results["clean"] >= 0.9, results
    assert results["noisy"] < results["clean"] - 0.3, results
