import numpy as np
import pytest

from scorers.leak import find_leaks


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_planted_near_copies_and_exact_copies_are_found_and_nothing_else():
    rng = np.random.default_rng(0)
    d = 64
    eval_emb = _unit(rng.standard_normal((200, d)))
    clean = _unit(rng.standard_normal((1000, d)))
    near_src = rng.choice(200, 30, replace=False)
    near = _unit(eval_emb[near_src] + 0.02 * rng.standard_normal((30, d)))  # cosine ≈ 0.99
    exact_src = rng.choice(200, 5, replace=False)
    exact = eval_emb[exact_src] + 0.5 * rng.standard_normal((5, d)).astype(np.float32)  # far in embedding, same bytes
    exact = _unit(exact)
    train = np.concatenate([clean, near, exact])
    eval_hashes = np.array([f"h{j}" for j in range(200)], dtype=object)
    train_hashes = np.array([None] * 1030 + [f"h{j}" for j in exact_src], dtype=object)
    result = find_leaks(train, eval_emb, eps=0.05, train_hashes=train_hashes, eval_hashes=eval_hashes)
    leaked = np.flatnonzero(result.match >= 0)
    np.testing.assert_array_equal(leaked, np.arange(1000, 1035))
    np.testing.assert_array_equal(result.match[1000:1030], near_src)
    np.testing.assert_array_equal(result.match[1030:], exact_src)
    assert result.exact[1030:].all() and not result.exact[:1030].any()
    assert (result.similarity[1000:1030] >= 0.95).all()
    assert np.isnan(result.similarity[:1000]).all()


def test_eps_boundary_is_inclusive_and_best_match_wins():
    e = np.eye(4, dtype=np.float32)
    # a training row at cosine exactly 0.9 from eval row 0 and 0.95 from... (constructed in 2-D)
    t = np.array([[0.9, np.sqrt(1 - 0.81), 0, 0]], dtype=np.float32)
    assert find_leaks(t, e, eps=0.1).match[0] == 0
    assert find_leaks(t, e, eps=0.09).match[0] == -1
    both = np.array([[0.8, 0.0, 0.6, 0.0], [0.6, 0.0, 0.8, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(find_leaks(both, e, eps=0.5).match, [0, 2])


def test_bad_arguments():
    e = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="both"):
        find_leaks(e, e, train_hashes=np.array(["a"] * 3, dtype=object))
    with pytest.raises(ValueError, match="dim"):
        find_leaks(e, np.eye(4, dtype=np.float32))
    assert (find_leaks(e, np.zeros((0, 3), np.float32)).match == -1).all()
