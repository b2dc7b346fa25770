"""Coreset reweighting: propagation exactness, normalisation, sampler statistics, Meta-Weight-Net, k-center, CRAIG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.loader import weighted_loss, weighted_sampler
from scorers.reweight import (
    coreset_reweight,
    facility_location,
    k_center_greedy,
    meta_weight_net_weights,
    normalise_weights,
    propagate_weights,
    voronoi_cell_sizes,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models: one thread is faster than contending for busy cores (and keeps the suite light).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n: int, d: int, c: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * spread
    y = rng.integers(c, size=n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _brute_knn(x: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(x[:, None, :].astype(np.float64) - c[None, :, :].astype(np.float64), axis=2)
    nbr = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, nbr, 1), nbr


# --- propagation -------------------------------------------------------------------------------------------------


def test_propagate_1nn_equals_brute_force_and_streams() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    core = rng.normal(size=(37, 8)).astype(np.float32)
    cw = rng.uniform(0.1, 2.0, size=37)
    _, nbr = _brute_knn(x, core, 1)
    expected = cw[nbr[:, 0]]
    np.testing.assert_array_equal(propagate_weights(x, core, cw), expected)
    # Chunked streaming (uneven last block) gives the same answer.
    np.testing.assert_array_equal(propagate_weights(x, core, cw, chunk=77), expected)


def test_coreset_rows_keep_their_own_weight() -> None:
    x, _ = _blobs(300, 5, 3, seed=1)
    idx = np.arange(0, 300, 7)
    cw = np.linspace(0.2, 1.8, idx.size)
    w = propagate_weights(x, x[idx], cw)
    np.testing.assert_allclose(w[idx], cw)
    # k > 1: a row at distance 0 from a coreset row takes exactly that row's weight.
    np.testing.assert_allclose(propagate_weights(x, x[idx], cw, k=3)[idx], cw)


def test_propagate_knn_inverse_distance_formula() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    core = rng.normal(size=(25, 6)).astype(np.float32)
    cw = rng.uniform(0.0, 3.0, size=25)
    d, nbr = _brute_knn(x, core, 4)
    inv = 1.0 / d
    expected = (inv * cw[nbr]).sum(1) / inv.sum(1)
    np.testing.assert_allclose(propagate_weights(x, core, cw, k=4, chunk=50), expected, rtol=1e-4)
    # k larger than the coreset averages over all of it.
    d_all, nbr_all = _brute_knn(x, core, 25)
    inv = 1.0 / d_all
    np.testing.assert_allclose(propagate_weights(x, core, cw, k=100), (inv * cw[nbr_all]).sum(1) / inv.sum(1),
                               rtol=1e-4)


def test_propagate_same_class_restriction() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    labels = rng.integers(3, size=400)
    cidx = rng.choice(400, size=40, replace=False)
    core, clab = x[cidx], labels[cidx]
    cw = rng.uniform(0.1, 2.0, size=40)
    w = propagate_weights(x, core, cw, same_class=True, labels=labels, coreset_labels=clab, chunk=64)
    expected = np.empty(400)
    for c in range(3):
        rows, crows = np.flatnonzero(labels == c), np.flatnonzero(clab == c)
        _, nbr = _brute_knn(x[rows], core[crows], 1)
        expected[rows] = cw[crows][nbr[:, 0]]
    np.testing.assert_array_equal(w, expected)
    # The restriction matters on this data (otherwise the test could not fail).
    assert not np.array_equal(w, propagate_weights(x, core, cw))
    # k-NN within class: string labels work too.
    names = np.array(["a", "b", "c"])
    w3 = propagate_weights(x, core, cw, k=3, same_class=True, labels=names[labels], coreset_labels=names[clab])
    rows = np.setdiff1d(np.flatnonzero(labels == 1), cidx)  # coreset rows sit at distance 0: tested elsewhere
    crows = np.flatnonzero(clab == 1)
    d, nbr = _brute_knn(x[rows], core[crows], 3)
    np.testing.assert_allclose(w3[rows], ((cw[crows][nbr] / d).sum(1) / (1 / d).sum(1)), rtol=1e-4)


def test_propagate_bad_inputs() -> None:
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="dimension|emb must be"):
        propagate_weights(np.zeros((10, 4)), x, np.ones(10))
    with pytest.raises(ValueError, match="coreset_weights"):
        propagate_weights(x, x, np.ones(9))
    with pytest.raises(ValueError, match="negative"):
        propagate_weights(x, x, -np.ones(10))
    with pytest.raises(ValueError, match="labels"):
        propagate_weights(x, x, np.ones(10), same_class=True)
    with pytest.raises(ValueError, match="no coreset sample"):
        propagate_weights(x, x[:5], np.ones(5), same_class=True, labels=np.arange(10) % 2,
                          coreset_labels=np.zeros(5, int))
    with pytest.raises(ValueError, match="k must"):
        propagate_weights(x, x, np.ones(10), k=0)


# --- normalisation and the training-loop adapters ----------------------------------------------------------------


def test_normalise_weights_mean_one_over_kept_zero_elsewhere() -> None:
    rng = np.random.default_rng(4)
    w = rng.uniform(0.0, 5.0, size=500)
    keep = rng.random(500) < 0.6
    out = normalise_weights(w, keep)
    assert out[keep].mean() == pytest.approx(1.0, abs=1e-12)
    assert np.all(out[~keep] == 0)
    np.testing.assert_allclose(out[keep] / w[keep], (out[keep] / w[keep])[0])  # one common scale
    assert normalise_weights(w).mean() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="keep"):
        normalise_weights(w, np.zeros(500, bool))
    with pytest.raises(ValueError, match="all zero"):
        normalise_weights(np.zeros(5))
    with pytest.raises(ValueError, match="keep must"):
        normalise_weights(w, np.ones(499, bool))


class _Weighted:
    """What pipeline.loader.weighted_sampler reads: `.weights` and a length."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights.astype(np.float32)

    def __len__(self) -> int:
        return self.weights.shape[0]


def test_weighted_sampler_draws_proportional_to_propagated_weights() -> None:
    x, _ = _blobs(60, 4, 3, seed=5)
    core = np.arange(0, 60, 6)
    w = normalise_weights(propagate_weights(x, x[core], np.linspace(0.1, 3.0, core.size)))
    draws = 200_000
    counts = np.bincount(np.fromiter(weighted_sampler(_Weighted(w), num_samples=draws, seed=0), dtype=np.int64),
                         minlength=60)
    expected = draws * w / w.sum()
    # Multinomial: each count within 5 binomial standard deviations of its expectation.
    sd = np.sqrt(expected * (1 - w / w.sum()))
    assert np.all(np.abs(counts - expected) <= 5 * sd + 1)
    assert counts[np.argmax(w)] > counts[np.argmin(w)]


def test_weighted_loss_is_sum_wl_over_sum_w() -> None:
    loss = torch.tensor([1.0, 2.0, 4.0])
    w = torch.tensor([0.5, 1.0, 2.5])
    assert float(weighted_loss(loss, w)) == pytest.approx((0.5 + 2.0 + 10.0) / 4.0)
    assert float(weighted_loss(loss, 7 * w)) == pytest.approx(float(weighted_loss(loss, w)))


# --- Meta-Weight-Net -------------------------------------------------------------------------------------------


def _noisy(n: int, seed: int, rate: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = _blobs(n, 16, 5, seed=seed)
    rng = np.random.default_rng(seed + 100)
    flip = rng.random(n) < rate
    yn = y.copy()
    yn[flip] = (y[flip] + rng.integers(1, 5, size=int(flip.sum()))) % 5
    return x, yn, flip


def test_mwn_downweights_flipped_labels() -> None:
    x, yn, flip = _noisy(1200, seed=1)
    core = np.arange(0, 1200, 2)  # a coreset of half the rows
    res = meta_weight_net_weights(x, yn, core, epochs=15, seed=0)
    f = flip[core]
    assert res.weights.shape == (core.size,) and np.all((res.weights > 0) & (res.weights < 1))
    assert res.weights[f].mean() < 0.5 * res.weights[~f].mean()
    # Held-out meta split: stratified, about meta_fraction of each class, disjoint from training rows.
    assert 0.15 < res.is_meta.mean() < 0.25
    assert set(np.unique(yn[core][res.is_meta])) == set(np.unique(yn[core]))
    assert res.info["n_meta"] + res.info["n_train"] == core.size
    assert res.info["meta_loss_end"] < res.info["meta_loss_start"]
    # The returned weight net is monotone-decreasing in the loss over the range that matters here.
    with torch.no_grad():
        v = res.weight_net(torch.tensor([[0.01], [5.0]])).squeeze(1)
    assert float(v[0]) > float(v[1])


def test_mwn_model_mode_and_deterministic() -> None:
    x, yn, flip = _noisy(400, seed=2)
    core = np.arange(400)
    user = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    before = [p.detach().clone() for p in user.parameters()]
    a = meta_weight_net_weights(x, yn, core, model=user, epochs=10, seed=3)
    b = meta_weight_net_weights(x, yn, core, model=user, epochs=10, seed=3)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert all(torch.equal(p, q) for p, q in zip(before, user.parameters()))  # the user's model is not touched
    assert a.info["mode"] == "model"
    assert a.weights[flip].mean() < a.weights[~flip].mean()


def test_mwn_bad_inputs() -> None:
    x, y = _blobs(50, 4, 2, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        meta_weight_net_weights(x, y, np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="coreset_idx"):
        meta_weight_net_weights(x, y, np.array([0, 99]))
    with pytest.raises(ValueError, match="meta_fraction"):
        meta_weight_net_weights(x, y, np.arange(10), meta_fraction=1.0)
    with pytest.raises(ValueError, match="meta_split"):
        meta_weight_net_weights(x, y, np.arange(10), meta_split="clean")
    with pytest.raises(ValueError, match="labels"):
        meta_weight_net_weights(x, y[:10], np.arange(10))


# --- classic coreset weights -------------------------------------------------------------------------------------


def _cover_radius(x: np.ndarray, centres: np.ndarray) -> float:
    d, _ = _brute_knn(x, x[centres], 1)
    return float(d.max())


def test_k_center_greedy_covers() -> None:
    x, _ = _blobs(800, 6, 4, seed=6)
    idx = k_center_greedy(x, 40, seed=0)
    assert idx.shape == (40,) and np.unique(idx).size == 40
    radii = [_cover_radius(x, idx[:k]) for k in (1, 5, 10, 20, 40)]
    assert all(a >= b for a, b in zip(radii, radii[1:])) and radii[-1] < radii[0]
    # Greedy choice: each new centre is the row farthest from the centres before it.
    for k in (1, 7, 30):
        d, _ = _brute_knn(x, x[idx[:k]], 1)
        assert d[idx[k], 0] == pytest.approx(d.max(), rel=1e-5)
    # The classic 2-approximation beats (or ties) random centres on the cover radius.
    rand = np.random.default_rng(0).choice(800, size=40, replace=False)
    assert radii[-1] <= _cover_radius(x, rand)


def test_voronoi_cell_sizes_sum_to_n_and_match_brute_force() -> None:
    x, _ = _blobs(500, 5, 3, seed=7)
    idx = k_center_greedy(x, 12, seed=1)
    w = voronoi_cell_sizes(x, idx, chunk=64)
    _, nbr = _brute_knn(x, x[idx], 1)
    np.testing.assert_array_equal(w, np.bincount(nbr[:, 0], minlength=12))
    assert w.sum() == 500 and np.all(w >= 1)  # every centre covers at least itself


def _fl_value(u: np.ndarray, sel: np.ndarray) -> float:
    return float((1.0 + u @ u[sel].T).max(1).sum())


def test_facility_location_weights_and_greedy() -> None:
    x, y = _blobs(600, 8, 4, seed=8)
    idx, w = facility_location(x, 30, batch=4)
    assert idx.shape == (30,) and np.unique(idx).size == 30
    assert w.sum() == 600 and np.all(w >= 1)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Weights = sizes of the clusters of rows most similar to each selected row.
    np.testing.assert_array_equal(w, np.bincount(np.argmax(u @ u[idx].T, axis=1), minlength=30))
    # Lazy greedy equals plain greedy (first 5 picks, exhaustively), and beats random sets of the same size.
    sel: list[int] = []
    for _ in range(5):
        gains = [(_fl_value(u, np.array(sel + [j])) if j not in sel else -1) for j in range(600)]
        sel.append(int(np.argmax(gains)))
    assert list(idx[:5]) == sel
    rng = np.random.default_rng(0)
    assert all(_fl_value(u, idx) > _fl_value(u, rng.choice(600, 30, replace=False)) for _ in range(5))
    # Per class: budgets split in proportion, weights count rows of the same class, still sum to n.
    idx_c, w_c = facility_location(x, 20, labels=y)
    assert w_c.sum() == 600 and idx_c.size == 20
    start = 0
    for c in np.unique(y):
        k = int(np.sum(y[idx_c] == c))
        assert w_c[start:start + k].sum() == np.sum(y == c)
        start += k
    with pytest.raises(ValueError, match="budget"):
        facility_location(x, 601)


# --- end to end --------------------------------------------------------------------------------------------------


def test_propagate_cosine_option_matches_prenormalised() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 5)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(300, 1)).astype(np.float32)
    core = rng.normal(size=(20, 5)).astype(np.float32)
    cw = rng.uniform(size=20)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_array_equal(propagate_weights(x, core, cw, cosine=True, chunk=64),
                                  propagate_weights(unit(x), unit(core), cw))


def test_coreset_reweight_end_to_end() -> None:
    x, yn, flip = _noisy(1000, seed=4)
    keep = np.ones(1000, bool)
    keep[::10] = False
    res = coreset_reweight(x, yn, coreset_fraction=0.3, keep=keep, epochs=5, seed=0)
    assert res.weights[keep].mean() == pytest.approx(1.0) and np.all(res.weights[~keep] == 0)
    assert res.coreset_idx.size == round(0.3 * keep.sum()) and keep[res.coreset_idx].all()
    # Coreset rows keep their own (rescaled) MW-Net weight: 1-NN of a row is itself.
    scale = res.weights[res.coreset_idx] / res.coreset_weights
    np.testing.assert_allclose(scale, scale[0])
    assert res.info["coreset"]["why"].startswith("moderate")
