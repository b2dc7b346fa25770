import numpy as np
import pytest

from scorers.label_issues import label_issues_from_embeddings, label_issues_from_probs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flipped_labels_are_found_with_their_true_label_suggested(one_torch_thread):
    rng = np.random.default_rng(0)
    n_classes, per, d = 5, 200, 32
    centres = 2.0 * rng.standard_normal((n_classes, d))
    true = np.repeat(np.arange(n_classes), per)
    emb = _unit(centres[true] + rng.standard_normal((len(true), d)))
    names = np.array(["ant", "bee", "cat", "dog", "eel"], dtype=object)
    flipped = rng.choice(len(true), len(true) // 10, replace=False)
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    result = label_issues_from_embeddings(emb, names[given], n_seeds=2, epochs=10, seed=0)
    found = np.flatnonzero(result.is_issue)
    tp = len(np.intersect1d(found, flipped))
    precision, recall = tp / max(len(found), 1), tp / len(flipped)
    assert precision > 0.8 and recall > 0.8, (precision, recall)
    assert (result.suggested_label[flipped] == names[true[flipped]]).mean() > 0.9
    # label_quality: flipped rows score lower than the rest
    assert np.median(result.label_quality[flipped]) < np.quantile(np.delete(result.label_quality, flipped), 0.05)


def test_from_probs_checks_shapes_and_filter():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.1, 0.9]] * 5)
    codes = np.array([0, 1, 0, 0] * 5)
    result = label_issues_from_probs(codes, probs)
    assert result.is_issue[3] and not result.is_issue[0]
    assert result.suggested[3] == 1
    with pytest.raises(ValueError, match="filter_by"):
        label_issues_from_probs(codes, probs, filter_by="nope")
    with pytest.raises(ValueError, match="aligned"):
        label_issues_from_probs(codes[:3], probs)
