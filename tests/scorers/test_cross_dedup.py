import numpy as np

from scorers.cross_dedup import cross_semdedup


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_matches_brute_force_over_blocks():
    rng = np.random.default_rng(0)
    old = _unit(rng, 50)
    new = np.concatenate([old[[3, 7]] + 1e-4, _unit(rng, 20)])
    new[5] = new[4] + 1e-4  # a duplicate of an earlier new row
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    eps = 0.01
    is_dup, dup_of, best = cross_semdedup(new, [old[:17], old[17:]], eps=eps, block=3)
    everything = np.concatenate([old, new])
    for j in range(len(new)):
        sims = everything[: 50 + j] @ new[j]
        i = int(sims.argmax())
        assert np.isclose(best[j], sims.max(), atol=1e-6)
        assert is_dup[j] == (sims.max() > 1 - eps)
        if is_dup[j]:
            assert dup_of[j] == (i if i < 50 else -2 - (i - 50))
    assert dup_of[0] == 3 and dup_of[1] == 7 and dup_of[5] == -2 - 4
    assert is_dup.sum() == 3


def test_first_new_row_without_old_rows_has_no_earlier():
    rng = np.random.default_rng(1)
    is_dup, dup_of, best = cross_semdedup(_unit(rng, 2), [], eps=0.5)
    assert best[0] == -np.inf and dup_of[0] == -1 and not is_dup[0]
