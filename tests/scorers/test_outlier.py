import numpy as np
import pytest

from scorers.outlier import knn_search, outlier_scores


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _blobs(rng: np.random.Generator, n_per: int, centres: np.ndarray, spread: float) -> np.ndarray:
    return _unit(np.repeat(centres, n_per, axis=0) + spread * rng.standard_normal((n_per * len(centres), centres.shape[1])))


def test_knn_search_matches_brute_force_and_skips_self():
    rng = np.random.default_rng(0)
    emb = _unit(rng.standard_normal((300, 16)))
    dist, ids = knn_search(emb, k=5)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.argsort(-sim, axis=1)[:, :5]
    assert not (ids == np.arange(300)[:, None]).any()
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(dist, 1 - np.take_along_axis(sim, expected, 1), atol=1e-5)


def test_exact_copies_still_get_k_neighbours_and_zero_distance():
    rng = np.random.default_rng(1)
    emb = _unit(rng.standard_normal((50, 8)))
    emb = np.concatenate([emb, emb[:10]])  # rows 50..59 copy rows 0..9
    dist, ids = knn_search(emb, k=3)
    assert (ids >= 0).all()
    assert not (ids == np.arange(60)[:, None]).any()
    np.testing.assert_allclose(dist[:10, 0], 0.0, atol=1e-6)
    assert set(ids[:10, 0]) == set(range(50, 60))


def test_planted_off_domain_rows_rank_first_by_kth_distance():
    rng = np.random.default_rng(2)
    d = 32
    centres = 3 * rng.standard_normal((5, d))
    inliers = _blobs(rng, 200, centres, 0.5)
    off = _unit(rng.standard_normal((10, d)))  # random directions, far from every blob
    emb = np.concatenate([inliers, off])
    result = outlier_scores(emb, k=10)
    top = set(np.argsort(-result.kth_distance)[:10])
    assert top == set(range(len(inliers), len(emb)))
    top_ratio = set(np.argsort(-result.density_ratio)[:10])
    assert top_ratio == set(range(len(inliers), len(emb)))


def test_density_ratio_finds_a_local_outlier_the_global_distance_misses():
    # A tight cluster and a loose one; one point just outside the tight cluster is closer to its neighbours than
    # the loose cluster's points are to theirs, so only the local ratio singles it out (the LOF example).
    rng = np.random.default_rng(3)
    d = 8
    a, b = np.zeros(d), np.zeros(d)
    a[0], b[1] = 1.0, 1.0
    tight = _unit(a + 0.01 * rng.standard_normal((200, d)))
    loose = _unit(b + 0.2 * rng.standard_normal((200, d)))
    probe = a.copy()
    probe[2] = 0.12
    emb = np.concatenate([tight, loose, _unit(probe[None])])
    result = outlier_scores(emb, k=10)
    assert np.argmax(result.density_ratio) == len(emb) - 1
    assert result.kth_distance[-1] < np.quantile(result.kth_distance[200:400], 0.9)  # the global score does not
    assert 0.5 < np.median(result.density_ratio[:400]) < 1.5


def test_reuses_a_given_index_and_refuses_a_mismatched_one():
    import faiss

    rng = np.random.default_rng(4)
    emb = _unit(rng.standard_normal((100, 8)))
    index = faiss.IndexFlatIP(8)
    index.add(emb)
    np.testing.assert_allclose(outlier_scores(emb, k=4, index=index).kth_distance, outlier_scores(emb, k=4).kth_distance)
    with pytest.raises(ValueError, match="index holds"):
        outlier_scores(emb[:50], k=4, index=index)
    with pytest.raises(ValueError, match="more than k"):
        outlier_scores(emb[:4], k=4)


def test_float16_memmap_rows_work(tmp_path):
    rng = np.random.default_rng(5)
    emb = _unit(rng.standard_normal((64, 8))).astype(np.float16)
    path = tmp_path / "e.npy"
    np.save(path, emb)
    mm = np.load(path, mmap_mode="r")
    result = outlier_scores(mm, k=3)
    assert result.kth_distance.dtype == np.float32 and np.isfinite(result.kth_distance).all()
