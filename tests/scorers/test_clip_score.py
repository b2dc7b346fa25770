import numpy as np
import pytest

from scorers.clip_score import clip_scores, label_agreement


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_clip_score_is_the_rowwise_cosine_and_nan_without_caption():
    rng = np.random.default_rng(0)
    img = _unit(rng.standard_normal((10, 8)))
    txt = _unit(rng.standard_normal((10, 8)))
    has = np.array([True] * 9 + [False])
    got = clip_scores(img, txt, has_text=has)
    np.testing.assert_allclose(got[:9], (img * txt).sum(1)[:9], rtol=1e-6)
    assert np.isnan(got[9])
    with pytest.raises(ValueError, match="align"):
        clip_scores(img, txt[:5])


def test_planted_mismatched_captions_score_lowest():
    rng = np.random.default_rng(1)
    img = _unit(rng.standard_normal((200, 32)))
    txt = _unit(img + 0.1 * rng.standard_normal((200, 32)))  # captions that describe their images
    bad = rng.choice(200, 20, replace=False)
    txt[bad] = _unit(rng.standard_normal((20, 32)))  # captions of something else
    scores = clip_scores(img, txt)
    assert set(np.argsort(scores)[:20]) == set(bad)


def test_label_agreement_flags_flipped_labels():
    rng = np.random.default_rng(2)
    classes = _unit(rng.standard_normal((4, 16)))
    true = rng.integers(0, 4, 300)
    img = _unit(classes[true] + 0.1 * rng.standard_normal((300, 16)))
    given = true.copy()
    flipped = rng.choice(300, 30, replace=False)
    given[flipped] = (true[flipped] + 1) % 4
    result = label_agreement(img, classes, given, top_k=1)
    np.testing.assert_array_equal(np.flatnonzero(result.mismatch), np.sort(flipped))
    np.testing.assert_array_equal(result.predicted, true)
    assert (label_agreement(img, classes, given, top_k=4).mismatch == 0).all()
    with pytest.raises(ValueError, match="top_k"):
        label_agreement(img, classes, given, top_k=5)
