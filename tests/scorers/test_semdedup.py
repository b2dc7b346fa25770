"""SemDeDup against a brute-force dense reference on synthetic clusters with planted duplicates of known similarity."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import scorers.semdedup as sd
from scorers.semdedup import (
    eps_for_keep_fraction,
    rank_in_cluster,
    semdedup,
    semdedup_cluster,
    split_giant_clusters,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _near_copy(x: np.ndarray, target_sim: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine similarity exactly ``target_sim`` (in float64) to unit ``x``."""
    v = rng.normal(size=x.shape)
    v = _unit(v - (v @ x) * x)
    return target_sim * x + np.sqrt(1.0 - target_sim**2) * v


# Planted similarities: exact copies, then near copies on both sides of the tested thresholds 1 - eps.
PLANTED_SIMS = [1.0, 0.99995, 0.9997, 0.9992, 0.998, 0.995, 0.985, 0.97]
EPS = [0.0001, 0.001, 0.01, 0.02]


def _dataset(seed: int = 0, k: int = 6, per: int = 150, d: int = 48, n_planted: int = 80):
    """Clustered unit embeddings (background pairs have sim < 0.9) plus planted (base, copy) pairs."""
    rng = np.random.default_rng(seed)
    cent = _unit(rng.normal(size=(k, d)))
    labels = np.repeat(np.arange(k), per)
    x = _unit(cent[labels] + 0.25 * rng.normal(size=(k * per, d)))
    bases = rng.choice(len(x), n_planted, replace=False)
    sims = np.array([PLANTED_SIMS[i % len(PLANTED_SIMS)] for i in range(n_planted)])
    copies = np.stack([_near_copy(x[b], s, rng) for b, s in zip(bases, sims)])
    emb = np.concatenate([x, copies]).astype(np.float32)
    cluster_ids = np.concatenate([labels, labels[bases]])
    uids = np.array([f"img{i:05d}" for i in rng.permutation(len(emb))])
    pairs = np.stack([bases, np.arange(len(x), len(emb))], axis=1)
    true_sim = (emb[pairs[:, 0]].astype(np.float64) * emb[pairs[:, 1]]).sum(1)
    return emb, cluster_ids, cent, uids, pairs, true_sim


def _dense_reference(emb, cluster_ids, centroids, uids, eps):
    """Brute force in float64: full n x n per cluster, keep-hard order with uid ties, compare with all earlier items."""
    e = _unit(emb.astype(np.float64))
    mu = _unit(centroids.astype(np.float64))
    dup = {x: np.zeros(len(e), bool) for x in eps}
    max_sim = np.full(len(e), -np.inf)
    for c in np.unique(cluster_ids):
        rows = np.flatnonzero(cluster_ids == c)
        dist = 1 - e[rows] @ mu[c]
        order = rows[sorted(range(len(rows)), key=lambda i: (-dist[i], uids[rows[i]]))]
        s = e[order] @ e[order].T
        for j in range(1, len(order)):
            max_sim[order[j]] = s[:j, j].max()
    for x in eps:
        dup[x] = max_sim > 1 - x
    return max_sim, dup


def test_matches_dense_reference_and_finds_planted_duplicates():
    emb, cid, cent, uids, pairs, true_sim = _dataset()
    res = semdedup(emb, cid, cent, uids, eps=EPS, batch_size=64)
    ref_sim, ref_dup = _dense_reference(emb, cid, cent, uids, EPS)
    np.testing.assert_allclose(res.max_sim, ref_sim, atol=2e-6)
    assert set(res.duplicate) == set(EPS)  # several eps in one pass
    for e in EPS:
        assert np.array_equal(res.duplicate[e], ref_dup[e]), e
        # Planted truth: a pair above 1 - eps loses exactly one member; nothing else is flagged (precision = recall = 1).
        flagged = res.duplicate[e]
        should = true_sim > 1 - e
        pair_hits = flagged[pairs].sum(axis=1)
        recall = (pair_hits[should] == 1).mean()
        assert recall == 1.0, (e, recall)
        assert (pair_hits[~should] == 0).all()
        assert flagged.sum() == should.sum()
        # dup_of names the other member of the pair.
        for a, b in pairs[should]:
            loser, winner = (b, a) if flagged[b] else (a, b)
            assert res.dup_of_at(e)[loser] == winner
    # Masks are nested: a larger eps never un-flags an item.
    for lo, hi in zip(EPS, EPS[1:]):
        assert not (res.duplicate[lo] & ~res.duplicate[hi]).any()
    assert (res.dup_of_at(EPS[0])[~res.duplicate[EPS[0]]] == -1).all()


def test_fp32_resolves_small_eps():
    """A pair at similarity 1 - 4e-4 is a duplicate at eps = 1e-3 and not at eps = 2e-4 (fp16 math could not tell)."""
    rng = np.random.default_rng(3)
    a = _unit(rng.normal(size=256))
    b = _near_copy(a, 1 - 4e-4, rng)
    emb = np.stack([a, b]).astype(np.float32)
    ms, prior = semdedup_cluster(emb, order=np.array([0, 1]))
    assert ms[0] == -np.inf and prior[0] == -1 and prior[1] == 0
    assert abs(ms[1] - (1 - 4e-4)) < 2e-6
    assert ms[1] > 1 - 1e-3 and not ms[1] > 1 - 2e-4


@pytest.mark.parametrize("batch_size,tile", [(1, 1 << 25), (16, 512), (64, 256), (5000, 1 << 25), (13, 13)])
def test_batched_equals_dense(batch_size, tile, monkeypatch):
    monkeypatch.setattr(sd, "_TILE_ELEMENTS", tile)  # small tiles exercise the row tiling + running max
    rng = np.random.default_rng(1)
    n = 300
    emb = _unit(rng.normal(size=(n, 32))).astype(np.float32)
    emb[50] = emb[10]  # an exact duplicate and a near one, so some max_sims are large
    emb[200] = _unit(emb[120] + 0.01 * rng.normal(size=32))
    order = rng.permutation(n)
    ms, prior = semdedup_cluster(emb, order=order, batch_size=batch_size)
    s = emb.astype(np.float64)[order] @ emb.astype(np.float64)[order].T
    dense_ms = np.full(n, -np.inf)
    dense_prior = np.full(n, -1)
    for j in range(1, n):
        dense_ms[order[j]] = s[:j, j].max()
        dense_prior[order[j]] = order[np.argmax(s[:j, j])]
    np.testing.assert_allclose(ms, dense_ms, atol=2e-6)
    assert np.array_equal(prior, dense_prior)


def test_prior_above_only_skips_the_argmax():
    rng = np.random.default_rng(2)
    emb = _unit(rng.normal(size=(200, 24))).astype(np.float32)
    for i in range(0, 60, 3):  # near copies at assorted similarities
        emb[100 + i] = _near_copy(emb[i].astype(np.float64), 0.95 + 0.0025 * (i // 3), rng)
    order = rng.permutation(200)
    full_ms, full_prior = semdedup_cluster(emb, order=order, batch_size=16)
    for thr in (0.96, 0.99, np.float32(full_ms[np.argsort(full_ms)[-5]])):  # the last: exactly a max_sim value
        ms, prior = semdedup_cluster(emb, order=order, batch_size=16, prior_above=float(thr))
        assert np.array_equal(ms, full_ms)
        above = full_ms.astype(np.float64) > float(thr)
        assert above.any()
        assert np.array_equal(prior[above], full_prior[above]) and (prior[~above] == -1).all()


def test_chain_is_dropped_by_the_reference_rule():
    """A~B, B~C, A≁C ranked A, B, C: B is a duplicate of A and C of B, although B itself is dropped."""
    theta = np.arccos(1 - 0.004)  # consecutive sims 0.996, A·C = cos(2 theta) ~ 0.984
    a, b, c = (np.array([np.cos(t * theta), np.sin(t * theta), 0.0]) for t in range(3))
    eps = 0.01
    assert a @ b > 1 - eps and b @ c > 1 - eps and a @ c < 1 - eps
    emb = np.stack([c, a, b]).astype(np.float32)  # rows shuffled against the ranking on purpose
    ms, prior = semdedup_cluster(emb, order=np.array([1, 2, 0]))
    assert prior.tolist() == [2, -1, 1]  # C -> B, A first, B -> A
    assert (ms > 1 - eps).tolist() == [True, False, True]
    # Same through semdedup: a centroid beyond C ranks A (farthest), B, C under keep="hard".
    mu = np.array([[np.cos(3 * theta), np.sin(3 * theta), 0.0]])
    res = semdedup(emb, np.zeros(3, np.int64), mu, np.array(["c", "a", "b"]), eps=eps)
    assert res.rank.tolist() == [2, 0, 1]
    assert res.duplicate[eps].tolist() == [True, False, True]
    assert res.dup_of_at(eps).tolist() == [2, -1, 1]


def test_deterministic_across_runs_and_row_permutations():
    emb, cid, cent, uids, _, _ = _dataset(seed=5)
    for keep in ("hard", "easy", "random"):
        r1 = semdedup(emb, cid, cent, uids, eps=[0.001, 0.02], keep=keep, batch_size=50, seed=7)
        r2 = semdedup(emb, cid, cent, uids, eps=[0.001, 0.02], keep=keep, batch_size=50, seed=7)
        assert np.array_equal(r1.max_sim, r2.max_sim) and np.array_equal(r1.dup_of, r2.dup_of)
        perm = np.random.default_rng(11).permutation(len(emb))
        rp = semdedup(emb[perm], cid[perm], cent, uids[perm], eps=[0.001, 0.02], keep=keep, batch_size=50, seed=7)
        # Same uid set -> same duplicate uids, same dup_of uids, bit-identical max_sim per uid.
        for e in (0.001, 0.02):
            assert set(uids[r1.duplicate[e]]) == set(uids[perm][rp.duplicate[e]])
        back = np.argsort(perm)
        assert np.array_equal(rp.max_sim[back], r1.max_sim)
        assert np.array_equal(rp.rank[back], r1.rank)
        has = r1.dup_of >= 0
        assert np.array_equal(uids[perm][rp.dup_of[back][has]], uids[r1.dup_of[has]])


def test_random_keep_depends_on_seed():
    emb, cid, cent, uids, _, _ = _dataset(seed=2)
    ranks = [semdedup(emb, cid, cent, uids, eps=0.01, keep="random", seed=s).rank for s in (0, 1)]
    assert not np.array_equal(*ranks)


def test_ties_broken_by_uid():
    """Exact copies tie on distance; the smaller uid ranks first and is the one kept, whatever the row order."""
    rng = np.random.default_rng(4)
    base = _unit(rng.normal(size=(5, 16)))
    emb = np.concatenate([base, base[[2, 2, 4]]]).astype(np.float32)
    uids = np.array(["e", "b", "z", "a", "q", "c", "y", "k"])  # copies of row 2 ("z"): "c", "y"; of row 4 ("q"): "k"
    cent = _unit(base.mean(0, keepdims=True))
    for perm in (np.arange(8), rng.permutation(8), rng.permutation(8)):
        res = semdedup(emb[perm], np.zeros(8, np.int64), cent, uids[perm], eps=1e-4)
        kept = set(uids[perm][~res.duplicate[1e-4]])
        assert kept == {"e", "b", "a", "c", "k"}
        dup_of = {uids[perm][i]: uids[perm][j] for i, j in enumerate(res.dup_of_at(1e-4)) if j >= 0}
        assert dup_of == {"y": "c", "z": "c", "q": "k"}  # ties in similarity go to the higher-ranked item


def test_many_exact_copies_keep_the_smallest_uid():
    rng = np.random.default_rng(13)
    emb = _unit(rng.normal(size=(600, 48))).astype(np.float32)
    copies = rng.choice(600, 40, replace=False)
    emb[copies] = emb[copies[0]]
    uids = np.array([f"s{v:04d}" for v in rng.permutation(600)])
    cent = _unit(emb.mean(0, keepdims=True))
    for keep in ("hard", "easy"):
        res = semdedup(emb, np.zeros(600, np.int64), cent, uids, eps=1e-5, keep=keep)
        kept_copies = copies[~res.duplicate[1e-5][copies]]
        assert uids[kept_copies].tolist() == [min(uids[copies])]
        assert len(set(res.dist_to_centroid[copies].tolist())) == 1
        assert (res.dup_of_at(1e-5)[copies] >= 0).sum() == 39


def test_rank_in_cluster_orders():
    dist = np.array([0.3, 0.1, 0.5, 0.3, 0.2])
    uids = np.array(["d", "e", "a", "b", "c"])
    assert rank_in_cluster(dist, uids, keep="hard").tolist() == [2, 3, 0, 4, 1]  # 0.3 tie: "b" before "d"
    assert rank_in_cluster(dist, uids, keep="easy").tolist() == [1, 4, 3, 0, 2]
    r = rank_in_cluster(dist, uids, keep="random", seed=3)
    assert sorted(r.tolist()) == list(range(5))
    perm = np.array([4, 2, 0, 1, 3])
    rp = rank_in_cluster(dist[perm], uids[perm], keep="random", seed=3)
    assert uids[perm][rp].tolist() == uids[r].tolist()  # row order does not matter
    with pytest.raises(ValueError, match="keep"):
        rank_in_cluster(dist, uids, keep="median")
    with pytest.raises(ValueError, match="unique"):
        rank_in_cluster(dist, np.array(["a", "a", "b", "c", "d"]))


def test_eps_for_keep_fraction_is_the_closest_achievable():
    rng = np.random.default_rng(8)
    ms = np.concatenate([rng.uniform(0.5, 1.0, 997), [-np.inf] * 3, [1.0] * 20]).astype(np.float32)
    n = len(ms)
    achievable = np.array([(ms <= t).sum() for t in np.concatenate([[-1.0], np.unique(ms[np.isfinite(ms)])])])
    for target in (0.0, 0.1, 0.37, 0.5, 0.9, 0.99, 1.0):
        eps = eps_for_keep_fraction(ms, target)
        kept = (~sd.duplicate_mask(ms, eps)).sum()
        assert abs(kept - target * n) == np.abs(achievable - target * n).min(), target
    assert (~sd.duplicate_mask(ms, eps_for_keep_fraction(ms, 0.0))).sum() == 3  # -inf rows are always kept
    with pytest.raises(ValueError, match="target_keep_fraction"):
        eps_for_keep_fraction(ms, 1.5)
    with pytest.raises(ValueError, match="empty"):
        eps_for_keep_fraction(np.array([]), 0.5)


def test_eps_tuned_on_a_sample_transfers():
    emb, cid, cent, uids, _, _ = _dataset(seed=9, k=8, n_planted=200)
    full = semdedup(emb, cid, cent, uids, eps=0.01)
    sample = np.isin(cid, [0, 2, 4, 6])  # half the clusters, as the paper tunes eps
    eps = eps_for_keep_fraction(full.max_sim[sample], 0.95)
    assert abs((~sd.duplicate_mask(full.max_sim[sample], eps)).mean() - 0.95) < 0.01
    assert abs((~sd.duplicate_mask(full.max_sim, eps)).mean() - 0.95) < 0.05


def test_float16_input_agrees_with_float32():
    emb, cid, cent, uids, _, _ = _dataset(seed=6)
    r32 = semdedup(emb, cid, cent, uids, eps=0.01)
    r16 = semdedup(emb.astype(np.float16), cid, cent, uids, eps=0.01)
    np.testing.assert_allclose(r16.max_sim, r32.max_sim, atol=2e-3)
    assert (r16.duplicate[0.01] != r32.duplicate[0.01]).sum() <= 2


def test_cuda_request_errors_without_gpu_or_matches_cpu():
    """One device policy (scorers/device.py): an explicit 'cuda' with no GPU is an error, not a silent CPU run."""
    emb, cid, cent, uids, _, _ = _dataset(seed=1, k=3, per=60, n_planted=20)
    cpu = semdedup(emb, cid, cent, uids, eps=0.01)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            semdedup(emb, cid, cent, uids, eps=0.01, device="cuda")
        return
    other = semdedup(emb, cid, cent, uids, eps=0.01, device="cuda")
    np.testing.assert_allclose(other.max_sim, cpu.max_sim, atol=2e-6)


def test_bad_inputs_are_named():
    emb, cid, cent, uids, _, _ = _dataset(seed=0, k=2, per=20, n_planted=4)
    with pytest.raises(ValueError, match="uids must be unique"):
        semdedup(emb, cid, cent, np.array(["x"] * len(emb)), eps=0.01)
    with pytest.raises(ValueError, match="cluster_ids"):
        semdedup(emb, cid + 5, cent, uids, eps=0.01)
    with pytest.raises(ValueError, match="eps"):
        semdedup(emb, cid, cent, uids, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        semdedup(emb, cid, cent, uids, eps=[])
    with pytest.raises(ValueError, match="dimension"):
        semdedup(emb, cid, cent[:, :5], uids, eps=0.01)
    with pytest.raises(ValueError, match="permutation"):
        semdedup_cluster(emb[:3], order=np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="device"):
        semdedup(emb, cid, cent, uids, eps=0.01, device="tpu")
    zero = emb.copy()
    zero[3] = 0
    with pytest.raises(ValueError, match="zero or non-finite"):
        semdedup(zero, cid, cent, uids, eps=0.01)


def test_split_giant_clusters():
    rng = np.random.default_rng(12)
    d = 16
    cent = _unit(rng.normal(size=(3, d)))
    sizes = [40, 600, 30]
    labels = np.repeat(np.arange(3), sizes)
    emb = _unit(cent[labels] + 0.4 * rng.normal(size=(len(labels), d))).astype(np.float32)
    uids = np.array([f"u{i}" for i in range(len(labels))])
    new_ids, new_cent = split_giant_clusters(emb, labels, cent, max_cluster_size=200, uids=uids, seed=0)
    assert new_cent.shape == (3 + 5, d)  # 2 * ceil(600 / 200) = 6 parts: id 1 plus 5 new ids
    np.testing.assert_allclose(np.linalg.norm(new_cent, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(new_ids[labels != 1], labels[labels != 1])  # small clusters untouched
    assert set(np.unique(new_ids[labels == 1])) <= {1, 3, 4, 5, 6, 7}
    assert np.bincount(new_ids).max() < 600
    perm = rng.permutation(len(labels))
    ids_p, cent_p = split_giant_clusters(emb[perm], labels[perm], cent, max_cluster_size=200, uids=uids[perm], seed=0)
    assert np.array_equal(ids_p[np.argsort(perm)], new_ids)  # uid order makes the split row-order independent
    np.testing.assert_array_equal(cent_p, new_cent)
    # The split output feeds semdedup directly.
    res = semdedup(emb, new_ids, new_cent, uids, eps=0.05)
    assert res.max_sim.shape == (len(labels),)
