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


def _brute(emb: np.ndarray, k: int, reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-th NN distance and density ratio by dense numpy: neighbours among the other rows, or among the reference rows."""
    ref = emb if reference is None else reference
    d_ref = 1 - ref @ ref.T
    np.fill_diagonal(d_ref, np.inf)
    ref_mean = np.sort(d_ref, axis=1)[:, :k].mean(axis=1)
    d = 1 - emb @ ref.T
    if reference is None:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1)[:, :k]
    near = np.take_along_axis(d, order, 1)
    return near[:, -1], near.mean(axis=1) / ref_mean[order].mean(axis=1)


def _with_group(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inliers from 5 blobs, a held-out reference from the same blobs, a tight off-domain group of 40 (more than k) and
    5 isolated random rows."""
    d = 32
    centres = 3 * rng.standard_normal((5, d))
    inliers = _blobs(rng, 200, centres, 0.5)
    reference = _blobs(rng, 60, centres, 0.5)
    group = _blobs(rng, 40, 3 * rng.standard_normal((1, d)), 0.5)  # another domain: its rows are each other's neighbours
    isolated = _unit(rng.standard_normal((5, d)))
    return inliers, reference, group, isolated


def test_scores_match_a_dense_computation_with_and_without_a_reference():
    rng = np.random.default_rng(6)
    inliers, reference, group, isolated = _with_group(rng)
    emb = np.concatenate([inliers, group, isolated])
    for ref in (None, reference):
        result = outlier_scores(emb, k=7, reference=ref)
        kth, ratio = _brute(emb, 7, ref)
        np.testing.assert_allclose(result.kth_distance, kth, atol=1e-5)
        np.testing.assert_allclose(result.density_ratio, ratio, rtol=1e-4)


def test_a_planted_off_domain_group_is_found_only_against_a_reference():
    rng = np.random.default_rng(7)
    inliers, reference, group, isolated = _with_group(rng)
    emb = np.concatenate([inliers, group, isolated])
    planted = set(range(len(inliers), len(emb)))  # the group and the isolated rows: 45
    pool_only = outlier_scores(emb, k=10)
    top_pool = set(np.argsort(-pool_only.kth_distance)[:45])
    # without a reference the group is as dense as the inliers: only the isolated rows stand out
    assert set(range(len(inliers) + len(group), len(emb))) <= top_pool
    assert len(top_pool & set(range(len(inliers), len(inliers) + len(group)))) < 10
    for score in ("kth_distance", "density_ratio"):
        against = getattr(outlier_scores(emb, k=10, reference=reference), score)
        assert set(np.argsort(-against)[:45]) == planted, score


def test_reference_mode_checks_its_inputs_and_reuses_a_reference_index():
    import faiss

    rng = np.random.default_rng(8)
    emb = _unit(rng.standard_normal((50, 8)))
    ref = _unit(rng.standard_normal((30, 8)))
    index = faiss.IndexFlatIP(8)
    index.add(ref)
    np.testing.assert_allclose(outlier_scores(emb, k=4, reference=ref, reference_index=index).kth_distance,
                               outlier_scores(emb, k=4, reference=ref).kth_distance)
    assert outlier_scores(emb, k=4, reference=ref).neighbors.max() < 30  # reference row ids
    with pytest.raises(ValueError, match="index holds 30 rows"):
        outlier_scores(emb, k=4, reference=ref[:20], reference_index=index)
    with pytest.raises(ValueError, match="more than k=4 reference rows"):
        outlier_scores(emb, k=4, reference=ref[:4])
    with pytest.raises(ValueError, match="dim"):
        outlier_scores(emb, k=4, reference=_unit(rng.standard_normal((30, 6))))


def test_reference_rows_own_scores_are_leave_one_out_and_set_a_novelty_threshold():
    rng = np.random.default_rng(9)
    inliers, reference, group, isolated = _with_group(rng)
    emb = np.concatenate([inliers, group, isolated])
    result = outlier_scores(emb, k=7, reference=reference)
    own_kth, own_ratio = _brute(reference, 7)  # each reference row among the other reference rows
    np.testing.assert_allclose(result.reference_kth_distance, own_kth, atol=1e-5)
    np.testing.assert_allclose(result.reference_density_ratio, own_ratio, rtol=1e-4)
    assert outlier_scores(emb, k=7).reference_kth_distance is None
    # the in-domain 95% quantile passes ~95% of fresh in-domain rows and none of the off-domain ones
    threshold = np.quantile(result.reference_kth_distance, 0.95)
    inlier_pass = float((result.kth_distance[:len(inliers)] <= threshold).mean())
    assert 0.85 <= inlier_pass < 1.0
    assert (result.kth_distance[len(inliers):] > threshold).all()
