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
    zeros = lambda n: np.zeros(n, dtype=np.int32)  # noqa: E731 - one cluster
    is_dup, dup_of, best = cross_semdedup(new, zeros(len(new)), [(old[:17], zeros(17)), (old[17:], zeros(33))], eps=eps, block=3)
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


def test_clusters_interleaved_in_blocks_match_brute_force_per_cluster():
    """Old rows of 3 clusters arrive interleaved over uneven blocks; each new row is compared only with its own
    cluster's old rows and the new rows of its cluster ranked before it (ties go to the first old row)."""
    rng = np.random.default_rng(2)
    old = _unit(rng, 90)
    old_cl = rng.integers(0, 4, size=90)  # cluster 3 has no new rows: never compared
    old[40] = old[10]  # a tie: the first one in stream order is named
    picks = [10, 11, 25, 60, 61]
    new = np.concatenate([old[picks] + 2e-4 * rng.normal(size=(5, 8)).astype(np.float32), _unit(rng, 30)])
    new[20] = new[12] + 1e-4
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    new_cl = np.concatenate([old_cl[picks], rng.integers(0, 3, size=30)])
    new_cl[20] = new_cl[12]
    eps = 0.01
    cuts = [0, 7, 8, 50, 90]
    blocks = [(old[a:b], old_cl[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    is_dup, dup_of, best = cross_semdedup(new, new_cl, blocks, eps=eps, block=4)
    for j in range(len(new)):
        same_old = np.flatnonzero(old_cl == new_cl[j])
        earlier_new = [i for i in range(j) if new_cl[i] == new_cl[j]]
        cand = [(float(old[i] @ new[j]), i) for i in same_old] + [(float(new[i] @ new[j]), -2 - i) for i in earlier_new]
        if not cand:
            assert best[j] == -np.inf and dup_of[j] == -1
            continue
        top = max(v for v, _ in cand)
        assert np.isclose(best[j], top, atol=1e-6)
        assert is_dup[j] == (top > 1 - eps)
        if is_dup[j]:
            assert dup_of[j] == next(i for v, i in cand if v >= best[j] - 1e-6)
    assert dup_of[0] == 10 and is_dup[:5].all() and dup_of[20] == -2 - 12


def test_first_new_row_without_old_rows_has_no_earlier():
    rng = np.random.default_rng(1)
    is_dup, dup_of, best = cross_semdedup(_unit(rng, 2), np.zeros(2, dtype=np.int32), [], eps=0.5)
    assert best[0] == -np.inf and dup_of[0] == -1 and not is_dup[0]


def test_within_threshold_matches_every_decision_of_the_full_comparison():
    """candidate_pairs + cross_semdedup_within against cross_semdedup over every old row: the same duplicates, the
    same dup_of (ties to the first old row), the same max_sim for duplicates; clustered float16 data in d = 64 with
    planted near copies at several distances around the threshold; the candidate bound never misses a pair."""
    from scorers.cross_dedup import candidate_pairs, cross_semdedup_within, project, projection

    rng = np.random.default_rng(3)
    d, k, eps = 64, 5, 0.01
    centres = _unit(rng, k, d)
    old_cl = rng.integers(0, k, size=3000)
    old = centres[old_cl] + 0.15 * rng.normal(size=(3000, d)).astype(np.float32)
    old = (old / np.linalg.norm(old, axis=1, keepdims=True)).astype(np.float16)  # the store's dtype
    old[2500] = old[100]  # a tie among old rows: the first is named
    picks = rng.choice(3000, size=60, replace=False)
    picks[0] = 100
    noise = rng.uniform(0.02, 0.2, size=(60, 1)) * rng.normal(size=(60, d)) / np.sqrt(d)  # cos ≈ 1 - s²/2, around 1 - eps
    fresh_cl = rng.integers(0, k, size=200)
    fresh = centres[fresh_cl] + 0.15 * rng.normal(size=(200, d))
    new = np.concatenate([old[picks].astype(np.float64) + noise, fresh])
    new[150] = new[149] + 1e-3  # a duplicate of an earlier new row
    new = (new / np.linalg.norm(new, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    new_cl = np.concatenate([old_cl[picks], fresh_cl])
    new_cl[150] = new_cl[149]
    full = cross_semdedup(new, new_cl, [(old, old_cl)], eps=eps)
    p = projection(d)
    assert np.allclose(p @ p.T, np.eye(len(p)), atol=1e-12)
    old32 = old.astype(np.float32)
    new_pos, old_pos = candidate_pairs(project(new, p), new_cl, project(old32, p), old_cl, eps=eps)
    every = new @ old32.T
    within = (every > 1 - eps) & (new_cl[:, None] == old_cl[None, :])
    pairs = set(zip(new_pos.tolist(), old_pos.tolist()))
    assert set(zip(*np.nonzero(within))) <= pairs  # no pair within the threshold is ever left out
    assert len(pairs) < 0.01 * within.size  # and the bound prunes nearly everything else
    is_dup, dup_of, best = cross_semdedup_within(new, new_cl, new_pos, old_pos, old32[old_pos], eps=eps)
    assert (is_dup == full[0]).all() and 20 < is_dup.sum() < 61
    assert (dup_of == full[1]).all() and dup_of[0] == 100
    assert np.allclose(best[is_dup], full[2][is_dup], atol=1e-6)
    assert (best[~is_dup] <= 1 - eps).all()
