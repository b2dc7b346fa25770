"""The selector: exact budgets for every rule (Hypothesis), class balance, and each rule's defining behaviour."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.select import (
    HEURISTIC_HARD_MIN_KEEP,
    RULES,
    _ccs_bin_budgets,
    ccs_default_beta,
    class_median_distance,
    proportional_budgets,
    select,
)


def knobs_for(rule: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if rule == "window":
        return {"offset": float(rng.uniform(0, 0.99))}
    if rule == "moderate":
        return {"embeddings": rng.normal(size=(n, 3))}
    if rule == "ccs":
        return {"beta": float(rng.choice([0.0, 0.1, 0.5])), "n_bins": int(rng.integers(1, 60))}
    return {}


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 120),
    rule=st.sampled_from(RULES),
    n_classes=st.integers(1, 5),
    balanced=st.booleans(),
    use_fraction=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_rule_keeps_exactly_the_budget(data, n, rule, n_classes, balanced, use_fraction, seed) -> None:
    # Integer-valued scores give many ties, the hard case for exactness.
    scores = np.array(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=float)
    labels = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    if use_fraction:
        frac = data.draw(st.floats(0.001, 1.0))
        kwargs = {"keep_fraction": frac}
        budget = int(np.floor(frac * n + 0.5))
    else:
        budget = data.draw(st.integers(0, n))
        kwargs = {"budget": budget}
    sel = select(scores, rule=rule, labels=labels, class_balanced=balanced, seed=seed,
                 **kwargs, **knobs_for(rule, n, seed))
    assert sel.keep.dtype == bool and sel.keep.shape == (n,)
    assert int(sel.keep.sum()) == budget
    assert sel.rule != "heuristic" and sel.why
    if balanced:
        sizes = np.bincount(labels, minlength=n_classes)
        kept = np.bincount(labels[sel.keep], minlength=n_classes)
        np.testing.assert_array_equal(kept, proportional_budgets(sizes, budget))
        assert np.all(np.abs(kept - sizes * budget / n) < 1)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=12), data=st.data())
def test_proportional_budgets_are_exact_and_within_one_of_the_share(sizes, data) -> None:
    sizes = np.array(sizes)
    total = data.draw(st.integers(0, int(sizes.sum())))
    b = proportional_budgets(sizes, total)
    assert b.sum() == total
    assert np.all(b <= sizes) and np.all(b >= 0)
    if sizes.sum():
        assert np.all(np.abs(b - sizes * total / sizes.sum()) < 1)


@settings(max_examples=200, deadline=None)
@given(pops=st.lists(st.integers(0, 40), min_size=1, max_size=60), data=st.data())
def test_ccs_bin_allocation_is_exact_and_fills_small_bins_first(pops, data) -> None:
    pops = np.array(pops)
    budget = data.draw(st.integers(0, int(pops.sum())))
    alloc = _ccs_bin_budgets(pops, budget)
    assert alloc.sum() == budget and np.all(alloc <= pops)
    # Any bin not taken in full got at least as much as every other bin (water-filling).
    partial = alloc < pops
    if partial.any():
        assert alloc[partial].min() >= alloc.max() - 1


def test_largest_remainder_worked_example() -> None:
    # shares 3.333.., 3.333.., 3.333.. of 10 -> 4, 3, 3 (equal remainders: earlier class first)
    np.testing.assert_array_equal(proportional_budgets(np.array([5, 5, 5]), 10), [4, 3, 3])
    # shares 1.4, 2.8, 5.8 -> floors 1, 2, 5 (8), remainders .4 .8 .8 -> +1 to classes 1 and 2
    np.testing.assert_array_equal(proportional_budgets(np.array([7, 14, 29]), 10), [1, 3, 6])


def test_hard_easy_and_tie_breaking_by_row_index() -> None:
    s = np.array([0.5, 0.9, 0.1, 0.9, 0.3, 0.7])
    np.testing.assert_array_equal(np.flatnonzero(select(s, budget=3, rule="hard").keep), [1, 3, 5])
    np.testing.assert_array_equal(np.flatnonzero(select(s, budget=2, rule="easy").keep), [2, 4])
    flat = np.zeros(10)
    np.testing.assert_array_equal(np.flatnonzero(select(flat, budget=4, rule="hard").keep), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(select(flat, budget=4, rule="easy").keep), [0, 1, 2, 3])


def test_hard_is_per_class_when_balanced() -> None:
    s = np.array([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array(["a"] * 4 + ["b"] * 4)
    sel = select(s, keep_fraction=0.5, rule="hard", labels=y)
    np.testing.assert_array_equal(np.flatnonzero(sel.keep), [0, 1, 6, 7])
    assert sel.info["class_budgets"] == {"a": 2, "b": 2}
    glob = select(s, keep_fraction=0.5, rule="hard", labels=y, class_balanced=False)
    np.testing.assert_array_equal(np.flatnonzero(glob.keep), [0, 1, 2, 3])
    assert "not class-balanced" in glob.why


def test_window_skips_the_hardest_offset_and_slides_back_at_the_end() -> None:
    s = np.arange(100, dtype=float)[::-1]  # row i has rank i (row 0 hardest)
    sel = select(s, budget=20, rule="window", offset=0.3)
    np.testing.assert_array_equal(np.flatnonzero(sel.keep), np.arange(30, 50))
    slid = select(s, budget=20, rule="window", offset=0.9)
    np.testing.assert_array_equal(np.flatnonzero(slid.keep), np.arange(80, 100))
    assert "slid back" in slid.why


def test_ccs_cuts_the_hardest_and_covers_sparse_bins() -> None:
    rng = np.random.default_rng(0)
    # 1000 rows packed in the lowest bin's width, 2 rows in each of the other 49 equal-width bins, and
    # 20 very hard rows far above (cut by beta).
    dense = rng.uniform(0.0, 0.01, 1000)
    sparse = np.repeat(np.arange(1, 50) / 50 + 0.005, 2)  # centres of bins 1..49 over [0, 1)
    hardest = np.linspace(10, 11, 20)
    s = np.concatenate([dense, sparse, [0.0, 0.9999], hardest])
    n = s.shape[0]
    sel = select(s, budget=200, rule="ccs", beta=20 / n, class_balanced=False, seed=1)
    assert sel.keep.sum() == 200 and sel.info["n_cut"] == 20
    assert not sel.keep[-20:].any()  # the beta cut
    sparse_idx = np.arange(1000, 1000 + sparse.shape[0])
    assert sel.keep[sparse_idx].all()  # every sparse bin taken in full before the dense one
    assert sel.keep[:1000].sum() + sel.keep[1098:1100].sum() == 200 - sparse.shape[0]
    # Uniform inside a bin: the seed decides which dense rows; the same seed, the same rows.
    again = select(s, budget=200, rule="ccs", beta=20 / n, class_balanced=False, seed=1)
    other = select(s, budget=200, rule="ccs", beta=20 / n, class_balanced=False, seed=2)
    np.testing.assert_array_equal(sel.keep, again.keep)
    assert not np.array_equal(sel.keep, other.keep)


def test_ccs_cut_can_use_a_different_score() -> None:
    s = np.linspace(0, 1, 100)
    cut = np.zeros(100)
    cut[:10] = 5.0  # e.g. -AUM: rows 0..9 look mislabeled although their EL2N is low
    sel = select(s, budget=50, rule="ccs", beta=0.1, cut_scores=cut, class_balanced=False)
    assert not sel.keep[:10].any() and "cut_scores" in sel.why


def test_ccs_default_beta_follows_the_table() -> None:
    assert [ccs_default_beta(f) for f in (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)] == [0, 0, 0, 0.1, 0.1, 0.3]
    sel = select(np.random.default_rng(0).normal(size=1000), keep_fraction=0.1, rule="ccs", class_balanced=False)
    assert sel.info["beta"] == 0.3 and sel.info["n_cut"] == 300


def test_moderate_keeps_the_middle_band_of_distance_to_the_class_median() -> None:
    # Per class, symmetric pairs ±r along one axis: the element-wise median is the class centre exactly,
    # so the distance of a row is its r.
    r = np.arange(1, 21, dtype=float)
    rows, labels = [], []
    for c, centre in enumerate([np.array([0.0, 0.0]), np.array([100.0, -50.0])]):
        for sign in (1, -1):
            rows.append(centre + np.stack([sign * r, np.zeros_like(r)], axis=1))
            labels += [c] * r.shape[0]
    emb = np.concatenate(rows)
    labels = np.array(labels)
    dist = class_median_distance(emb, labels)
    np.testing.assert_allclose(dist, np.tile(r, 4))
    sel = select(None, budget=24, rule="moderate", embeddings=emb, labels=labels)
    # 40 rows per class (each r twice), 12 kept: sorted ranks 14..25 = r in 8..13, both copies of each.
    for c in (0, 1):
        np.testing.assert_array_equal(np.sort(dist[sel.keep & (labels == c)]), np.repeat(np.arange(8, 14), 2))
    assert "median" in sel.why
    # Without embeddings it keeps the middle band of the given scores.
    mid = select(np.arange(10.0), budget=4, rule="moderate")
    np.testing.assert_array_equal(np.flatnonzero(mid.keep), [3, 4, 5, 6])


def test_numpy_scalars_and_string_labels_are_accepted() -> None:
    s = np.arange(12.0)
    sel = select(s, keep_fraction=np.float32(0.5), labels=np.array(list("abc") * 4), rule="easy")
    assert sel.keep.sum() == 6 and sel.info["class_budgets"] == {"a": 2, "b": 2, "c": 2}
    assert select(s, budget=np.int64(3), rule="hard").keep.sum() == 3


def test_random_is_seeded() -> None:
    s = np.zeros(200)
    a = select(s, budget=50, rule="random", seed=7)
    b = select(s, budget=50, rule="random", seed=7)
    c = select(s, budget=50, rule="random", seed=8)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert not np.array_equal(a.keep, c.keep)


@pytest.mark.parametrize("frac, expected", [(1.0, "hard"), (0.8, "hard"), (HEURISTIC_HARD_MIN_KEEP, "hard"),
                                            (0.69, "ccs"), (0.3, "ccs"), (0.1, "ccs")])
def test_heuristic_rule_by_keep_fraction(frac: float, expected: str) -> None:
    s = np.random.default_rng(0).normal(size=1000)
    sel = select(s, keep_fraction=frac, labels=np.arange(1000) % 4)
    assert sel.rule == expected
    assert sel.why.startswith("heuristic:") and expected in sel.why
    assert sel.info["heuristic"]["resolved"] == expected


def test_heuristic_ignores_ccs_knobs_when_it_picks_hard() -> None:
    s = np.arange(10.0)
    sel = select(s, keep_fraction=0.9, beta=0.2)
    assert sel.rule == "hard" and sel.info["heuristic"]["ignored_knobs"] == ["beta"]


def test_auto_is_a_step_rule_not_a_select_rule() -> None:
    with pytest.raises(ValueError, match="by evidence"):
        select(np.arange(10.0), keep_fraction=0.5, rule="auto")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"keep_fraction": -0.2}, "keep_fraction"),
        ({"keep_fraction": float("nan")}, "keep_fraction"),
        ({"keep_fraction": True}, "keep_fraction"),
        ({"budget": 11}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({}, "exactly one"),
        ({"budget": 3, "keep_fraction": 0.3}, "exactly one"),
        ({"budget": 3, "rule": "hardest"}, "unknown rule"),
        ({"budget": 3, "scores": np.array([np.nan] + [0.0] * 9)}, "NaN"),
        ({"budget": 3, "scores": np.ones((10, 2))}, "1-D"),
        ({"budget": 3, "rule": "hard", "offset": 0.1}, "do not apply"),
        ({"budget": 3, "rule": "window"}, "offset"),
        ({"budget": 3, "rule": "window", "offset": 1.0}, "offset"),
        ({"budget": 3, "rule": "ccs", "beta": 1.0}, "beta"),
        ({"budget": 3, "rule": "ccs", "n_bins": 0}, "n_bins"),
        ({"budget": 3, "rule": "ccs", "cut_scores": np.zeros(9)}, "cut_scores"),
        ({"budget": 3, "labels": np.zeros(9)}, "labels"),
        ({"budget": 3, "rule": "moderate", "embeddings": np.zeros((9, 2))}, "embeddings"),
        ({"budget": 3, "scores": None, "rule": "hard"}, "scores"),
    ],
)
def test_invalid_input_raises_clear_errors(kwargs: dict, match: str) -> None:
    args = {"scores": np.arange(10.0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select(args.pop("scores"), **args)
