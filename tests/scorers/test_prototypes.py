"""Prototype scores and the shared centroid geometry, against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scorers.prototypes import distance_to_centroid, fp32_matmul, nearest_centroid, prototype_scores


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    cent = _unit(rng.normal(size=(7, 20)))
    labels = rng.integers(0, 7, 500)
    emb = _unit(cent[labels] + 0.5 * rng.normal(size=(500, 20))).astype(np.float32)
    return emb, cent, labels


def test_values_match_direct_computation(data):
    emb, cent, _ = data
    sims = emb.astype(np.float64) @ cent.T
    expected = 1.0 - sims.max(axis=1)
    hard = prototype_scores(emb, cent, keep="hard", batch_size=64)
    assert hard.dtype == np.float32 and hard.shape == (500,)
    np.testing.assert_allclose(hard, expected, atol=2e-6)
    idx, sim = nearest_centroid(emb, cent, batch_size=37)
    assert np.array_equal(idx, sims.argmax(axis=1))
    np.testing.assert_allclose(sim, sims.max(axis=1), atol=2e-6)


def test_orientation_higher_means_keep(data):
    emb, cent, _ = data
    hard = prototype_scores(emb, cent, keep="hard")
    easy = prototype_scores(emb, cent, keep="easy")
    assert np.array_equal(easy, -hard)
    # A centroid itself is the easiest possible sample: lowest hard score, highest easy score.
    probe = np.concatenate([emb, cent[:1].astype(np.float32)])
    h = prototype_scores(probe, cent, keep="hard")
    assert h.argmin() == len(probe) - 1 and abs(h[-1]) < 1e-6
    assert prototype_scores(probe, cent, keep="easy").argmax() == len(probe) - 1
    assert (hard >= -1e-6).all() and (hard <= 2 + 1e-6).all()
    with pytest.raises(ValueError, match="keep"):
        prototype_scores(emb, cent, keep="random")


def test_unnormalised_inputs_are_normalised(data):
    emb, cent, _ = data
    scaled = prototype_scores(emb * 3.0, cent * 0.5)
    np.testing.assert_allclose(scaled, prototype_scores(emb, cent), atol=2e-6)
    assert np.allclose(prototype_scores(emb.astype(np.float16), cent), prototype_scores(emb, cent), atol=2e-3)


def test_distance_to_centroid_uses_assigned_centroid(data):
    emb, cent, labels = data
    d = distance_to_centroid(emb, labels, cent)
    expected = 1.0 - (emb.astype(np.float64) * cent[labels]).sum(axis=1) / np.linalg.norm(emb.astype(np.float64), axis=1)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, expected, atol=1e-6)
    with pytest.raises(ValueError, match="cluster_ids"):
        distance_to_centroid(emb, labels + 7, cent)
    with pytest.raises(ValueError, match="dimension"):
        distance_to_centroid(emb, labels, cent[:, :3])


@pytest.mark.parametrize("dim", [20, 33, 512])
def test_identical_rows_get_identical_distances(dim):
    """The uid tie-breaks need bit-equal distances for equal rows, wherever they sit (alignment, chunk, position)."""
    rng = np.random.default_rng(dim)
    row = _unit(rng.normal(size=dim)).astype(np.float32)
    others = _unit(rng.normal(size=(17000, dim)).astype(np.float32))  # > one 16384-row chunk
    at = rng.choice(17000, 50, replace=False)
    others[at] = row
    cent = _unit(rng.normal(size=(2, dim)))
    labels = np.zeros(17000, np.int64)
    for emb in (others, np.ascontiguousarray(others[1:]), others.astype(np.float16)):
        d = distance_to_centroid(emb, labels[: len(emb)], cent)
        hits = np.flatnonzero((emb == row.astype(emb.dtype)).all(axis=1))
        assert len(hits) >= 49 and len(set(d[hits].tolist())) == 1


def test_fp32_matmul_forces_and_restores_precision():
    cuda_mm = torch.backends.cuda.matmul
    if not hasattr(cuda_mm, "fp32_precision"):  # older torch: legacy flags
        prev = (torch.get_float32_matmul_precision(), cuda_mm.allow_tf32)
        try:
            torch.set_float32_matmul_precision("high")
            cuda_mm.allow_tf32 = True
            with fp32_matmul():
                assert torch.get_float32_matmul_precision() == "highest" and cuda_mm.allow_tf32 is False
            assert torch.get_float32_matmul_precision() == "high" and cuda_mm.allow_tf32 is True
        finally:
            torch.set_float32_matmul_precision(prev[0])
            cuda_mm.allow_tf32 = prev[1]
        return
    mkl_mm = torch.backends.mkldnn.matmul
    prev = (cuda_mm.fp32_precision, mkl_mm.fp32_precision)
    try:
        cuda_mm.fp32_precision, mkl_mm.fp32_precision = "tf32", "bf16"  # what a training script might have set
        with fp32_matmul():
            assert (cuda_mm.fp32_precision, mkl_mm.fp32_precision) == ("ieee", "ieee")
            assert cuda_mm.allow_tf32 is False
        assert (cuda_mm.fp32_precision, mkl_mm.fp32_precision) == ("tf32", "bf16")
    finally:
        cuda_mm.fp32_precision, mkl_mm.fp32_precision = prev


def test_bad_inputs(data):
    emb, cent, _ = data
    with pytest.raises(ValueError, match="2-D"):
        prototype_scores(emb[0], cent)
    with pytest.raises(ValueError, match="floating"):
        prototype_scores(emb.astype(np.int32), cent)
    zero = emb.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="first at 4"):
        prototype_scores(zero, cent)
    with pytest.raises(ValueError, match="batch_size"):
        nearest_centroid(emb, cent, batch_size=0)
