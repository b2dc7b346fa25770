import numpy as np
import pytest

from pipeline.index import KMeansParams, KnnParams, build_knn_index, load_kmeans, save_kmeans, spherical_kmeans


def _clusters(n_per=200, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([c + 0.05 * rng.normal(size=(n_per, d)) for c in centres]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(k), n_per)


def test_spherical_kmeans_recovers_planted_clusters_and_is_seeded(tmp_path):
    x, truth = _clusters()
    # Over-clustered (20 centroids for 5 planted clusters, as concept clustering is used): no found cluster mixes
    # planted clusters. (With k = 5 exactly, Lloyd's iterations from random seeds can merge two and split another.)
    a = spherical_kmeans(x, KMeansParams(k=20, seed=3))
    b = spherical_kmeans(x.astype(np.float16), KMeansParams(k=20, seed=3))
    for c in np.unique(a.assignment):
        assert len(set(truth[a.assignment == c])) == 1
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a.similarity, np.einsum("ij,ij->i", x, a.centroids[a.assignment]), atol=1e-5)
    # float16 input: the same centroids up to float16 rounding; only near-ties between sub-clusters may flip
    assert np.abs(a.centroids - b.centroids).max() < 0.05  # different clusterings differ by ~1
    assert np.mean(a.assignment == b.assignment) > 0.95
    save_kmeans(a, tmp_path, "key")
    again = load_kmeans(tmp_path, "key")
    assert np.array_equal(again.centroids, a.centroids) and again.params == a.params
    assert load_kmeans(tmp_path, "other") is None
    with pytest.raises(ValueError, match="lower index.k"):
        spherical_kmeans(x[:3], KMeansParams(k=5))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_knn_index_finds_true_neighbours(kind):
    x, _ = _clusters(n_per=400)
    index, info = build_knn_index(x, KnnParams(kind=kind, nlist=8, nprobe=8))
    assert info["kind"] == kind
    sims, ids = index.search(x[:50], 5)
    exact = np.argsort(-(x[:50] @ x.T), axis=1)[:, :5]
    assert (ids[:, 0] == np.arange(50)).all()  # every point is its own nearest neighbour
    recall = np.mean([len(set(ids[i]) & set(exact[i])) / 5 for i in range(50)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    assert build_knn_index(x, KnnParams(kind="auto", ivf_threshold=10**9))[1]["kind"] == "flat"
    with pytest.raises(ValueError, match="unknown knn"):
        build_knn_index(x, KnnParams(kind="hnsw"))
