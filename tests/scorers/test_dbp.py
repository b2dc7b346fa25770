"""DBP: cluster complexity against direct computation, quotas against the QP and their invariants, selection."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear

from scorers.dbp import cluster_complexity, dbp_quotas, dbp_select
from scorers.prototypes import distance_to_centroid


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters(seed=0, sizes=(40, 25, 60, 2, 1, 0, 30), d=16, spread=None):
    rng = np.random.default_rng(seed)
    k = len(sizes)
    cent = _unit(rng.normal(size=(k, d)))
    spread = spread if spread is not None else np.linspace(0.2, 0.8, k)
    labels = np.repeat(np.arange(k), sizes)
    emb = _unit(cent[labels] + spread[labels, None] * rng.normal(size=(len(labels), d))).astype(np.float32)
    return emb, labels, cent


def test_complexity_matches_direct_computation():
    emb, labels, cent = _clusters()
    cc = cluster_complexity(emb, labels, cent, n_neighbors=3)
    sizes = np.bincount(labels, minlength=len(cent))
    assert np.array_equal(cc.sizes, sizes)
    e = _unit(emb.astype(np.float64))
    for j in range(len(cent)):
        members = e[labels == j]
        if len(members):
            assert cc.d_intra[j] == pytest.approx(np.mean(1 - members @ cent[j]), abs=1e-6)
        else:
            assert np.isnan(cc.d_intra[j])
        others = sorted(1 - cent[j] @ cent[c] for c in range(len(cent)) if c != j)
        assert cc.d_inter[j] == pytest.approx(np.mean(others[:3]), abs=1e-12)
    big = sizes >= 3
    np.testing.assert_allclose(cc.complexity[big], (cc.d_inter * cc.d_intra)[big])
    # 1-2 item clusters take the mean of the others; the empty one stays NaN.
    np.testing.assert_allclose(cc.complexity[(sizes > 0) & ~big], np.mean((cc.d_inter * cc.d_intra)[big]))
    assert np.isnan(cc.complexity[sizes == 0]).all()
    # Spread drives d_intra: clusters were made with increasing noise.
    assert np.all(np.diff(cc.d_intra[[0, 1, 2]]) > 0)


def test_d_inter_uses_all_others_when_fewer_than_l():
    emb, labels, cent = _clusters(sizes=(10, 10, 10))
    cc = cluster_complexity(emb, labels, cent)  # l = 20 > k - 1 = 2
    assert cc.d_inter[0] == pytest.approx(np.mean([1 - cent[0] @ cent[1], 1 - cent[0] @ cent[2]]))


def _check_quota(q, sizes, budget, lb):
    assert q.dtype == np.int64
    assert q.sum() == budget
    assert (q >= lb).all() and (q <= sizes).all()


def _lb(sizes, m=1):
    return np.where(sizes > 0, np.minimum(m, sizes - 1), 0)


def test_quotas_exact_and_bounded():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 200, 50)
    comp = rng.uniform(0.01, 0.3, 50)
    for frac in (0.05, 0.3, 0.5, 0.77, 1.0):
        q = dbp_quotas(comp, sizes, keep_fraction=frac)
        _check_quota(q, sizes, int(np.floor(frac * sizes.sum() + 0.5)), _lb(sizes))
    assert (dbp_quotas(comp, sizes, budget=0, min_per_cluster=0) == 0).all()
    assert np.array_equal(dbp_quotas(comp, sizes, keep_fraction=1.0), sizes)
    single = np.array([1, 1, 5])  # 1-item clusters have lower bound 0 (reference: min(m, n - 1)); empty -> 0
    q = dbp_quotas(np.array([0.1, 0.2, 0.3]), single, budget=1)
    _check_quota(q, single, 1, np.array([0, 0, 1]))


def test_quotas_match_the_qp():
    """Continuous optimum of min ||x - N P||² s.t. sum x = N, lb <= x <= n (the paper's QP), rounded: within 1."""
    rng = np.random.default_rng(2)
    for trial in range(5):
        k = 8
        sizes = rng.integers(1, 40, k)
        comp = rng.uniform(0.0, 0.5, k)
        tau = [0.05, 0.1, 0.3, 1.0, 0.1][trial]
        budget = int(rng.integers(_lb(sizes).sum(), sizes.sum() + 1))
        p = np.exp(comp / tau - (comp / tau).max())
        p /= p.sum()
        lb = _lb(sizes)
        # Bounded least squares with the equality as a heavily weighted extra row (BVLS is exact for the bounds).
        w = 1e4
        a = np.vstack([np.eye(k), w * np.ones((1, k))])
        res = lsq_linear(a, np.concatenate([budget * p, [w * budget]]), bounds=(lb, sizes), method="bvls")
        assert res.success and abs(res.x.sum() - budget) < 1e-3
        q = dbp_quotas(comp, sizes, budget=budget, temperature=tau)
        _check_quota(q, sizes, budget, lb)
        assert np.abs(q - res.x).max() < 1 + 1e-3


def test_quotas_monotone_in_complexity_for_equal_sizes():
    sizes = np.full(30, 100)
    comp = np.random.default_rng(3).uniform(0, 0.4, 30)
    for tau in (0.02, 0.1, 1.0):
        q = dbp_quotas(comp, sizes, keep_fraction=0.3, temperature=tau)
        order = np.argsort(comp)
        assert (np.diff(q[order]) >= 0).all(), tau
    assert dbp_quotas(comp, sizes, keep_fraction=0.3, temperature=0.02)[np.argmax(comp)] == 100
    # Complexities too close to separate in P still rank the remainder: the more complex one is never behind.
    tiny = np.array([0.0, 0.0, 0.0, 1e-300])  # equal P; the remainder of 2 units must include cluster 3
    q = dbp_quotas(tiny, np.full(4, 10), budget=6)
    assert q.tolist() == [2, 1, 1, 2]


def test_temperature_limits():
    sizes = np.array([500, 200, 100, 50, 10, 5])
    comp = np.array([0.1, 0.3, 0.2, 0.05, 0.4, 0.15])
    # tau -> infinity: P uniform, so quotas equalise (water-filling min(n_j, t)) -- not size-proportional.
    q = dbp_quotas(comp, sizes, budget=300, temperature=1e6)
    level = (300 - 10 - 5 - 50) / 3  # the three smallest clusters are kept whole, the rest share equally
    assert q[3:].tolist() == [50, 10, 5]
    assert np.abs(q[:3] - level).max() < 1
    assert not np.allclose(q, 300 * sizes / sizes.sum(), atol=5)  # size-proportional would give [174, 70, 35, ...]
    # tau -> 0: P is one-hot on the most complex cluster; it takes the budget up to its size, the shift lambda spreads
    # the rest evenly (water-filling again), not in complexity order.
    assert dbp_quotas(comp, sizes, budget=300, temperature=1e-4).tolist() == [78, 79, 78, 50, 10, 5]  # tie: more complex
    top_big = np.array([0.5, 0.3, 0.2, 0.05, 0.4, 0.15])  # now the 500-item cluster is the most complex
    assert dbp_quotas(top_big, sizes, budget=300, temperature=1e-4).tolist() == [295, 1, 1, 1, 1, 1]


def test_class_balance_ratio_raises_the_floor():
    sizes = np.array([1000, 1000, 40, 40])
    comp = np.array([0.5, 0.4, 0.01, 0.02])
    plain = dbp_quotas(comp, sizes, budget=400, temperature=0.05)
    bal = dbp_quotas(comp, sizes, budget=400, temperature=0.05, class_balance_ratio=0.5)
    m = int(400 / 4 * 0.5)  # 50 per cluster, capped at n - 1
    _check_quota(bal, sizes, 400, np.minimum(m, sizes - 1))
    assert (bal[2:] == 39).all() and (plain[2:] < 39).all()


def test_infeasible_budgets_are_named():
    sizes = np.array([10, 10, 10])
    comp = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="infeasible DBP budget 31.*30"):
        dbp_quotas(comp, sizes, budget=31)
    with pytest.raises(ValueError, match=r"infeasible DBP budget 2:.*lower bounds 3"):
        dbp_quotas(comp, sizes, budget=2)
    with pytest.raises(ValueError, match="exactly one"):
        dbp_quotas(comp, sizes)
    with pytest.raises(ValueError, match="exactly one"):
        dbp_quotas(comp, sizes, budget=5, keep_fraction=0.5)
    with pytest.raises(ValueError, match="temperature"):
        dbp_quotas(comp, sizes, budget=5, temperature=0)
    with pytest.raises(ValueError, match="NaN"):
        dbp_quotas(np.array([0.1, np.nan, 0.3]), sizes, budget=5)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 60), st.floats(0.0, 1.0)), min_size=1, max_size=40),
    tau=st.floats(0.005, 50.0),
    m=st.integers(0, 5),
    where=st.floats(0.0, 1.0),
)
def test_quota_properties(data, tau, m, where):
    sizes = np.array([s for s, _ in data], dtype=np.int64)
    comp = np.array([c for _, c in data])
    lb = _lb(sizes, m)
    budget = int(lb.sum() + round(where * (sizes.sum() - lb.sum())))
    q = dbp_quotas(comp, sizes, budget=budget, temperature=tau, min_per_cluster=m)
    _check_quota(q, sizes, budget, lb)
    for i in range(len(q)):  # equal bounds: more complex never gets less
        same = (sizes == sizes[i]) & (comp > comp[i])
        assert (q[same] >= q[i]).all()
    if budget < sizes.sum():
        with pytest.raises(ValueError, match="infeasible"):
            dbp_quotas(comp, sizes, budget=int(sizes.sum()) + 1, temperature=tau, min_per_cluster=m)


def test_select_keeps_the_farthest_quota_per_cluster():
    emb, labels, cent = _clusters(seed=4)
    cc = cluster_complexity(emb, labels, cent)
    q = dbp_quotas(cc.complexity, cc.sizes, keep_fraction=0.4)
    keep = dbp_select(emb, labels, cent, q)
    assert keep.dtype == bool and keep.sum() == q.sum()
    assert np.array_equal(np.bincount(labels[keep], minlength=len(cent)), q)
    dist = 1 - _unit(emb.astype(np.float64)) @ cent.T
    for j in range(len(cent)):
        d = dist[labels == j, j]
        k = keep[labels == j]
        if k.any() and (~k).any():
            assert d[k].min() >= d[~k].max()
    given = dbp_select(emb, labels, cent, q, dist_to_centroid=dist[np.arange(len(emb)), labels])
    assert np.array_equal(given, keep)  # precomputed distances (e.g. from the k-means assignment) give the same pick
    with pytest.raises(ValueError, match="dist_to_centroid"):
        dbp_select(emb, labels, cent, q, dist_to_centroid=dist[:3, 0])
    easy = dbp_select(emb, labels, cent, q, keep="easy")
    for j in range(len(cent)):
        d, k = dist[labels == j, j], easy[labels == j]
        if k.any() and (~k).any():
            assert d[k].max() <= d[~k].min()


def test_select_ties_and_row_order():
    rng = np.random.default_rng(5)
    base = _unit(rng.normal(size=(4, 8)))
    emb = np.concatenate([base, base[[1, 1]]]).astype(np.float32)  # three identical rows tie on distance
    labels = np.zeros(6, np.int64)
    cent = _unit(base[[0]] + 3 * base[[1]])  # the copies are the nearest items: with keep="easy" they come first
    uids = np.array(["m", "z", "f", "g", "c", "x"])
    for perm in (np.arange(6), rng.permutation(6), rng.permutation(6)):
        keep = dbp_select(emb[perm], labels, cent, np.array([2]), keep="easy", uids=uids[perm])
        assert set(uids[perm][keep]) == {"c", "x"}  # of the tied "z", "c", "x": the two smallest uids
    by_row = dbp_select(emb, labels, cent, np.array([2]), keep="easy")
    assert np.flatnonzero(by_row).tolist() == [1, 4]  # without uids: the smaller row indices
    r1 = dbp_select(emb[perm], labels, cent, np.array([3]), keep="random", uids=uids[perm], seed=1)
    r2 = dbp_select(emb, labels, cent, np.array([3]), keep="random", uids=uids, seed=1)
    assert set(uids[perm][r1]) == set(uids[r2]) and r2.sum() == 3
    with pytest.raises(ValueError, match="quotas"):
        dbp_select(emb, labels, cent, np.array([7]))


def test_distances_alone_give_the_same_result_as_embeddings():
    emb, ids, cent = _clusters(seed=3)
    dist = distance_to_centroid(emb, ids, cent)
    full = cluster_complexity(emb, ids, cent, n_neighbors=3)
    lean = cluster_complexity(None, ids, cent, n_neighbors=3, dist_to_centroid=dist)
    np.testing.assert_array_equal(full.complexity, lean.complexity)
    quotas = dbp_quotas(full.complexity, full.sizes, keep_fraction=0.5)
    np.testing.assert_array_equal(dbp_select(emb, ids, cent, quotas), dbp_select(None, ids, cent, quotas, dist_to_centroid=dist))
    with pytest.raises(ValueError, match="only when dist_to_centroid"):
        cluster_complexity(None, ids, cent)
