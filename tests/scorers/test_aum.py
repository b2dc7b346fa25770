"""AUM: the margin arithmetic, input checks, and mislabeled rows getting low AUM on synthetic data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scorers.aum import aum_embedding_scores, aum_from_logits, margins
from scorers.el2n import el2n_embedding_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_aum_from_logits_matches_a_direct_loop() -> None:
    rng = np.random.default_rng(0)
    hist = rng.normal(size=(4, 30, 5))
    y = rng.integers(0, 5, 30)
    expected = np.zeros(30)
    for e in range(4):
        for i in range(30):
            others = np.delete(hist[e, i], y[i])
            expected[i] += (hist[e, i, y[i]] - others.max()) / 4
    got = aum_from_logits(hist, y)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_aum_small_worked_example() -> None:
    # Row 0: assigned class wins by 2 then by 4 -> AUM 3. Row 1: assigned class loses by 1 each epoch -> -1.
    hist = np.array([[[3.0, 1.0, 0.0], [2.0, 0.0, 1.0]],
                     [[5.0, 1.0, 0.0], [2.0, 0.0, 1.0]]])
    np.testing.assert_allclose(aum_from_logits(hist, np.array([0, 2])), [3.0, -1.0])


def test_margins_torch_helper_handles_ties() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    np.testing.assert_allclose(margins(logits, torch.tensor([0, 2])).numpy(), [0.0, 0.0])


@pytest.mark.parametrize(
    "hist, labels, match",
    [
        (np.zeros((3, 4)), np.zeros(4, dtype=int), "epochs, n, classes"),
        (np.zeros((0, 4, 3)), np.zeros(4, dtype=int), "no epochs"),
        (np.zeros((2, 4, 1)), np.zeros(4, dtype=int), "2 classes"),
        (np.full((2, 4, 3), np.nan), np.zeros(4, dtype=int), "NaN"),
        (np.zeros((2, 4, 3)), np.zeros(5, dtype=int), "shape"),
        (np.zeros((2, 4, 3)), np.array([0, 1, 2, 3]), "range"),
        (np.zeros((2, 4, 3)), np.zeros(4), "integer"),
    ],
)
def test_aum_from_logits_rejects_bad_input(hist: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aum_from_logits(hist, labels)


def test_embedding_aum_is_low_for_flipped_labels() -> None:
    rng = np.random.default_rng(5)
    n, d, c = 1500, 12, 3
    y_true = np.arange(n) % c
    x = (rng.normal(size=(c, d)) * 2.5)[y_true] + rng.normal(size=(n, d))
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, n // 10, replace=False)] = True
    y = np.where(flipped, (y_true + rng.integers(1, c, n)) % c, y_true)

    aum = aum_embedding_scores(x.astype(np.float32), y, n_seeds=2, n_folds=4, epochs=4)
    assert aum.shape == (n,) and aum.dtype == np.float32
    bottom = np.argsort(aum, kind="stable")[: int(0.15 * n)]
    assert flipped[bottom].sum() / flipped.sum() >= 0.8
    assert np.median(aum[flipped]) < 0 < np.median(aum[~flipped])

    # Same training loop as EL2N: the combined call returns the very same AUM.
    both = el2n_embedding_scores(x.astype(np.float32), y, n_seeds=2, n_folds=4, epochs=4, return_aum=True)
    np.testing.assert_array_equal(both.aum, aum)
