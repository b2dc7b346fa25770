"""pipeline/evaluate.py: uid-hash split, probes, paired bootstrap, selection vs random, the sweep."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import evaluate as ev


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def blobs(n: int, d: int = 16, classes: int = 4, spread: float = 1.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs on the unit sphere: (unit embeddings float32, int labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, d)) * spread / math.sqrt(d) * 3
    y = rng.integers(classes, size=n)
    x = means[y] + rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_holdout_split_depends_on_the_uid_only() -> None:
    uids = [f"img/{i:06d}.jpg" for i in range(20_000)]
    mask = ev.holdout_mask(uids, 0.2)
    assert abs(mask.mean() - 0.2) < 0.01
    perm = np.random.default_rng(0).permutation(len(uids))
    assert np.array_equal(ev.holdout_mask([uids[i] for i in perm], 0.2), mask[perm])
    # a larger fraction only adds rows: the 10% split lies inside the 20% split
    assert not (ev.holdout_mask(uids, 0.1) & ~mask).any()
    with pytest.raises(ValueError, match="holdout_fraction"):
        ev.holdout_mask(uids, 1.0)


def test_paired_bootstrap_matches_the_analytic_paired_interval() -> None:
    # T test rows; a right & b wrong on 15%, b right & a wrong on 5%, both right on 50%: difference 0.10,
    # paired SE = sqrt((p10 + p01 - d^2) / T).
    t = 4000
    a = np.zeros(t, bool)
    b = np.zeros(t, bool)
    a[:600] = True  # a only
    b[600:800] = True  # b only
    a[800:2800] = b[800:2800] = True  # both
    out = ev.paired_bootstrap(a[None], b[None], n_boot=4000, seed=1)
    assert out["difference"] == pytest.approx(0.10)
    se = math.sqrt((0.15 + 0.05 - 0.10**2) / t)
    lo, hi = out["difference_ci"]
    assert lo == pytest.approx(0.10 - 1.96 * se, abs=0.15 * 1.96 * se)
    assert hi == pytest.approx(0.10 + 1.96 * se, abs=0.15 * 1.96 * se)
    assert out["p_value"] < 0.001
    assert out["a"]["accuracy"] == pytest.approx(0.65) and out["b"]["accuracy"] == pytest.approx(0.55)
    assert ev.verdict(out) == "better"


def test_paired_bootstrap_finds_no_difference_where_there_is_none() -> None:
    t = 4000
    a = np.zeros(t, bool)
    b = np.zeros(t, bool)
    a[:1000] = True
    b[1000:2000] = True  # same accuracy, different rows
    out = ev.paired_bootstrap(a[None], b[None], n_boot=2000)
    assert out["difference"] == 0.0
    assert out["difference_ci"][0] < 0 < out["difference_ci"][1]
    assert out["p_value"] > 0.5
    assert ev.verdict(out) == "no significant difference"
    same = ev.paired_bootstrap(a[None], a[None], n_boot=200)
    assert same["difference_ci"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_seed_spread_widens_the_interval() -> None:
    # b's seeds disagree by 6 pp about accuracy: resampling seeds must widen the CI over identical seeds.
    t = 3000
    a = np.zeros(t, bool)
    a[:1800] = True
    steady = np.zeros((3, t), bool)
    steady[:, :1500] = True
    shaky = np.zeros((3, t), bool)
    for s, n in enumerate((1410, 1500, 1590)):
        shaky[s, :n] = True
    w_steady = np.diff(ev.paired_bootstrap(a[None], steady, n_boot=2000)["difference_ci"])[0]
    w_shaky = np.diff(ev.paired_bootstrap(a[None], shaky, n_boot=2000)["difference_ci"])[0]
    assert w_shaky > 1.3 * w_steady


def test_linear_probe_learns_separable_classes() -> None:
    x, y = blobs(1200, spread=3.0)
    xs, xt = ev.standardise(x[:1000], x[1000:])
    pred = ev.train_probes(xs, y[:1000], [np.arange(1000), np.arange(500)], xt, n_classes=4)
    assert pred.shape == (2, 200)
    assert (pred == y[1000:]).mean(1).min() > 0.9


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_selection_without_the_mislabeled_rows_beats_random(kind: str) -> None:
    # 30% of the pool's labels are systematically wrong (class c -> c+1); the selection keeps exactly the clean rows.
    x, y = blobs(4000, d=16, spread=1.2, seed=3)
    rng = np.random.default_rng(0)
    pool, test = np.arange(3000), np.arange(3000, 4000)
    y_pool = y[pool].copy()
    flipped = rng.random(len(pool)) < 0.3
    y_pool[flipped] = (y_pool[flipped] + 1) % 4
    probe = ev.ProbeSpec(kind=kind, steps=300)
    out = ev.evaluate_selection(x[pool], y_pool, ~flipped, x[test], y[test], seeds=3, probe=probe, n_boot=1000)
    assert out["verdict"] == "better", out
    assert out["p_value"] < 0.05 and out["difference_ci"][0] > 0
    assert out["selection"]["accuracy"] > out["random"]["accuracy"]
    assert out["n_kept_in_pool"] == int((~flipped).sum())
    assert len(out["random"]["per_seed"]) == 3


def test_random_selection_is_not_called_better() -> None:
    x, y = blobs(3000, seed=5)
    keep = np.zeros(2000, bool)
    keep[np.random.default_rng(9).permutation(2000)[:1000]] = True
    out = ev.evaluate_selection(x[:2000], y[:2000], keep, x[2000:], y[2000:], seeds=3, n_boot=1000)
    assert out["verdict"] == "no significant difference", out


def test_sweep_computes_scores_once_and_reuses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import scorers.el2n as el2n_mod

    calls = {"el2n": 0}
    real = el2n_mod.el2n_embedding_scores

    def counting(*args, **kwargs):
        calls["el2n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(el2n_mod, "el2n_embedding_scores", counting)
    x, y = blobs(1500, seed=7)
    y_pool = y[:1200].copy()
    flipped = np.random.default_rng(1).random(1200) < 0.25
    y_pool[flipped] = (y_pool[flipped] + 1) % 4
    scores = ev.sweep_scores(x[:1200], y_pool, k=8)
    assert calls["el2n"] == 1
    out = ev.sweep(x[:1200], y_pool, x[1200:], y[1200:], scores, fractions=(0.3, 0.6), seeds=2, n_boot=300)
    assert calls["el2n"] == 1  # every rule at every fraction ran on the same scores
    assert set(out["table"]) == {"0.3", "0.6"}
    assert set(out["table"]["0.3"]) == set(ev.SWEEP_RULES)
    # the flipped rows have the highest EL2N: keeping the hardest keeps them, keeping the easiest drops them
    assert out["table"]["0.6"]["easy"]["accuracy"] > out["table"]["0.6"]["hard"]["accuracy"]
    assert out["best"]["0.6"]["rule"] != "hard"
    full = out["full"]["accuracy"]
    expected = next((f for f in (0.3, 0.6) if out["best"][f"{f:g}"]["accuracy"] >= full - 0.01), None)
    assert out["suggested_budget"] == expected


def test_select_rule_keeps_the_budget() -> None:
    x, y = blobs(600, seed=2)
    scores = ev.sweep_scores(x, y, k=6, n_seeds=1, n_folds=2)
    for rule in ev.SWEEP_RULES:
        kept = ev.select_rule(rule, scores, y, 150, seed=1)
        assert len(kept) == 150 and len(np.unique(kept)) == 150, rule
    with pytest.raises(ValueError, match="unknown sweep rule"):
        ev.select_rule("hardest", scores, y, 10)
