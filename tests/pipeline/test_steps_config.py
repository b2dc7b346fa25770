import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import CurateConfig, load_config
from pipeline.index import KMeansParams, KMeansResult
from pipeline.scoring import run_steps
from scorers.step import ScoringContext
from scorers.exact_dup import exact_duplicates
from scorers.random import random_scores


def _ctx(n=40, labels=True, sha1=None):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    km = KMeansResult(np.eye(2, 8, dtype=np.float32), np.zeros(n, np.int32), np.zeros(n, np.float32), KMeansParams(k=2), False)
    return ScoringContext(
        emb=emb,
        uids=np.array([f"u{i:03d}" for i in range(n)], dtype=object),
        labels=np.array(["a", "b"] * (n // 2), dtype=object) if labels else None,
        sha1=np.array(sha1 if sha1 is not None else [f"h{i}" for i in range(n)], dtype=object),
        kmeans=km,
        alive=np.ones(n, bool),
        n_scorable=n,
    )


def test_exact_duplicates_keep_smallest_uid_whatever_the_order():
    hashes = np.array(["x", "y", "x", None, "x", None], dtype=object)
    uids = np.array(["c", "b", "a", "d", "e", "f"], dtype=object)
    dup_of = exact_duplicates(hashes, uids)
    assert dup_of.tolist() == [2, -1, -1, -1, 2, -1]
    perm = np.array([5, 4, 3, 2, 1, 0])
    assert [uids[perm][d] if d >= 0 else None for d in exact_duplicates(hashes[perm], uids[perm])] == [None, "a", None, None, None, "a"]


def test_random_scores_seeded():
    assert np.array_equal(random_scores(10, seed=3), random_scores(10, seed=3))
    assert not np.array_equal(random_scores(10, seed=3), random_scores(10, seed=4))


def test_steps_compose_with_fractions_of_all_rows():
    sha1 = [f"h{i}" for i in range(40)]
    sha1[5] = sha1[4]  # one exact duplicate: u005 copies u004
    ctx = _ctx(sha1=sha1)
    cols, notes = run_steps(ctx, [("exact_dup", {}), ("random", {"keep_fraction": 0.5})])
    reason = cols["reason"]
    assert reason[5] == "exact_dup" and cols["dup_of"][5] == 4
    assert (reason == None).sum() == 20  # noqa: E711 - object array comparison
    assert notes[0]["dropped"] == 1 and notes[1]["alive_after"] == 20
    kept_labels = ctx.labels[reason == None]  # noqa: E711
    assert (kept_labels == "a").sum() == 10  # class-balanced by default


def test_budget_larger_than_what_is_left_is_an_error():
    sha1 = ["same"] * 40
    with pytest.raises(ValueError) as refused:
        run_steps(_ctx(sha1=sha1), [("exact_dup", {}), ("random", {"keep_fraction": 0.5})])
    # a failure found only at run time names the step, the numbers, and what the earlier steps did
    assert str(refused.value) == ("step 1 (random): keep_fraction 0.5 asks for 20 rows but only 1 are left after earlier steps; "
                                  "keep_fraction is a fraction of all scorable rows (of 40 rows: step 0 (exact_dup) dropped 39; 1 left)")


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"scorer": "nope"}], "unknown scorer"),
        ([{"scorer": "random", "keep_fraction": 0}], "keep_fraction"),
        ([{"scorer": "random", "keep_fraction": 1.5}], "keep_fraction"),
        ([{"scorer": "random", "bogus": 1}], "unknown knobs"),
    ],
)
def test_bad_config_fails_before_work(steps, message):
    with pytest.raises(ValidationError, match=message):
        CurateConfig.model_validate({"source": {"kind": "image_folder", "root": "x"}, "steps": steps})


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nsource: {kind: image_folder, root: imgs}\nembed: {kind: pixels}\n")
    cfg = load_config(path, {"index.k": 7, "embed.shard_size": 10})
    assert cfg.index.k == 7 and cfg.embed.shard_size == 10 and cfg.embed.kind == "pixels"
    assert cfg.store_path == cfg.output_root / "t" / "store"
    with pytest.raises(ValueError, match="embed.unknown: unknown key"):
        load_config(path, {"embed.unknown": 1})
    with pytest.raises(ValueError, match="precomputed"):
        load_config(path, {"source.kind": "precomputed"})


def _clustered_ctx(seed=0):
    """Three tight clusters of 30 rows with two planted near-duplicates (cos ≈ 0.9999) and k-means from the pipeline."""
    from pipeline.index import spherical_kmeans

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16))
    emb = np.concatenate([c + 0.3 * rng.normal(size=(30, 16)) for c in centres]).astype(np.float32)
    emb[10] = emb[3] + 0.002 * rng.normal(size=16)
    emb[50] = emb[40] + 0.002 * rng.normal(size=16)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(emb)
    km = spherical_kmeans(emb, KMeansParams(k=3, seed=1))
    return ScoringContext(
        emb=emb,
        uids=np.array([f"u{i:03d}" for i in range(n)], dtype=object),
        labels=None,
        sha1=np.array([f"h{i}" for i in range(n)], dtype=object),
        kmeans=km,
        alive=np.ones(n, bool),
        n_scorable=n,
        device="cpu",
    )


def test_semdedup_then_dbp_compose_to_the_budget():
    ctx = _clustered_ctx()
    cols, notes = run_steps(ctx, [("semdedup", {"eps": 0.001, "eps_grid": [0.0001, 0.1]}), ("dbp", {"keep_fraction": 0.5})])
    reason = cols["reason"]
    dropped_dups = set(np.flatnonzero(reason == "semdedup"))
    assert len(dropped_dups) == 2  # exactly one of each planted pair
    assert len({3, 10} & dropped_dups) == 1 and len({40, 50} & dropped_dups) == 1
    for i in dropped_dups:
        partner = {3: 10, 10: 3, 40: 50, 50: 40}[i]
        assert cols["dup_of"][i] == partner
        assert cols["score_semdedup"][i] > 0.999
    assert (reason == None).sum() == 45  # noqa: E711 - DBP keeps exactly half of all rows
    assert notes[0]["kept_by_eps"]["0.1"] <= notes[0]["kept_by_eps"]["0.001"] <= notes[0]["kept_by_eps"]["0.0001"]
    quotas = notes[1]["quotas"]
    assert sum(q["quota"] for q in quotas) == 45 and all(q["quota"] <= q["size"] for q in quotas)
    assert np.isfinite(cols["score_dbp_cluster_complexity"][reason != "semdedup"]).all()


def test_semdedup_target_keep_of_entering_and_determinism():
    a, _ = run_steps(_clustered_ctx(), [("semdedup", {"target_keep_of_entering": 0.8})])
    b, notes = run_steps(_clustered_ctx(), [("semdedup", {"target_keep_of_entering": 0.8})])
    assert abs((a["reason"] == None).sum() - 72) <= 2  # noqa: E711
    assert np.array_equal(a["reason"], b["reason"]) and np.array_equal(a["dup_of"], b["dup_of"])
    dropped = np.flatnonzero(a["reason"] == "semdedup")
    assert (a["dup_of"][dropped] >= 0).all()


def test_el2n_step_flags_flipped_labels_and_selects_exactly():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.array(["a", "b"] * (n // 2), dtype=object)
    centre = np.where(labels == "a", 1.0, -1.0)[:, None] * np.eye(1, 8)
    emb = (centre + 0.35 * rng.normal(size=(n, 8))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flipped = rng.choice(n, 20, replace=False)
    noisy = labels.copy()
    noisy[flipped] = np.where(labels[flipped] == "a", "b", "a")
    ctx = _ctx(n=n)
    ctx.emb, ctx.labels = emb, noisy
    cols, notes = run_steps(ctx, [("el2n", {"keep_fraction": 0.8, "rule": "hard", "with_aum": True, "n_seeds": 2})])
    top = np.argsort(-cols["score_el2n"])[:40]
    assert len(set(top) & set(flipped)) >= 16  # most flipped labels rank in the top 10%
    assert np.mean(cols["score_aum"][flipped]) < np.mean(np.delete(cols["score_aum"], flipped))
    assert (cols["reason"] == "el2n").sum() == 80 and notes[0]["rule"] == "hard"
    with pytest.raises(ValueError, match="needs labels"):
        run_steps(_ctx(n=20, labels=False), [("el2n", {})])


def test_coreset_weights_fill_the_weight_column_and_renormalise_after_later_drops():
    rng = np.random.default_rng(1)
    n = 300
    labels = np.array(["a", "b", "c"] * (n // 3), dtype=object)
    centres = {"a": 0, "b": 1, "c": 2}
    emb = (np.eye(3, 8)[[centres[x] for x in labels]] + 0.3 * rng.normal(size=(n, 8))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ctx = _ctx(n=n)
    ctx.emb, ctx.labels = emb, labels
    cols, notes = run_steps(ctx, [("coreset_weight", {"coreset_fraction": 0.2}), ("random", {"keep_fraction": 0.5})])
    kept = cols["reason"] == None  # noqa: E711
    w = cols["weight"]
    assert w.dtype == np.float32 and (w[~kept] == 0).all() and (w[kept] > 0).all()
    assert np.isclose(w[kept].mean(), 1.0, atol=1e-5)
    assert np.nanstd(cols["score_coreset_weight"]) > 0  # not uniform: the weights carry information
    assert notes[0]["coreset"]["size"] == 60 and notes[0]["dropped"] == 0


def test_ot_target_estimates_how_much_to_keep():
    from scorers.step import target_key

    rng = np.random.default_rng(2)
    n = 400
    shift = np.zeros(4)
    shift[0] = 5.0
    emb = np.concatenate([rng.normal(size=(120, 4)) + shift, rng.normal(size=(280, 4)) - shift]).astype(np.float32)
    target_spec = {"kind": "precomputed", "emb_paths": "t.npy", "meta_paths": "t.parquet"}
    ctx = _ctx(n=n, labels=False)
    ctx.emb = emb
    ctx.targets = {target_key(target_spec): (rng.normal(size=(250, 4)) + shift).astype(np.float32)}
    cols, notes = run_steps(ctx, [("ot_target", {"target": target_spec, "estimate_ratio": True})])
    kept = np.flatnonzero(cols["reason"] == None)  # noqa: E711
    assert 0.15 <= notes[0]["estimated_ratio"] <= 0.45  # the target domain is 30% of the pool
    assert len(kept) == int(np.ceil(notes[0]["estimated_ratio"] * n)) and (kept < 120).mean() >= 0.95
    assert set(notes[0]["ratio_curve"]) and cols["score_ot"][:120].mean() > cols["score_ot"][120:].mean()
    with pytest.raises(ValueError, match="exactly one"):
        run_steps(_ctx(n=n, labels=False), [("ot_target", {"target": target_spec})])


def test_semdedup_score_of_a_clusters_first_row_sorts_as_least_redundant():
    """Each cluster's first-ranked row was compared with nothing: -1 (not NaN, which Polars sorts above every number)."""
    ctx = _clustered_ctx()
    cols, _ = run_steps(ctx, [("semdedup", {"eps": 0.001})])
    score = cols["score_semdedup"]
    assert not np.isnan(score).any()
    assert (score == -1.0).sum() == len(np.unique(ctx.kmeans.assignment))  # one first-ranked row per cluster


def test_dbp_quotas_follow_a_stored_complexity():
    """Append mode passes the previous version's per-cluster complexity: quotas follow it, not the rows' own spread;
    a cluster without a stored value (NaN) keeps the one measured on the rows."""
    import dataclasses

    base = _ctx(40)
    assignment = np.repeat(np.arange(2, dtype=np.int32), 20)
    km = KMeansResult(np.eye(2, 8, dtype=np.float32), assignment, np.zeros(40, np.float32), KMeansParams(k=2), False)
    measured = run_steps(dataclasses.replace(base, kmeans=km), [("dbp", {"keep_fraction": 0.5})])[0]["score_dbp_cluster_complexity"]
    for prior, favoured in (([0.01, 1.0], 1), ([1.0, 0.01], 0)):
        ctx = dataclasses.replace(base, kmeans=km, prior_complexity=np.array(prior))
        cols, notes = run_steps(ctx, [("dbp", {"keep_fraction": 0.5})])
        kept = np.array([r is None for r in cols["reason"]])
        assert kept[assignment == favoured].sum() == 19 and kept[assignment != favoured].sum() == 1
        assert np.allclose(cols["score_dbp_cluster_complexity"], np.array(prior)[assignment])
        assert notes[0]["complexity_from"].startswith("previous version for 2 clusters")
    ctx = dataclasses.replace(base, kmeans=km, prior_complexity=np.array([0.5, np.nan]))
    scores = run_steps(ctx, [("dbp", {"keep_fraction": 0.5})])[0]["score_dbp_cluster_complexity"]
    assert np.allclose(scores[assignment == 0], 0.5) and np.allclose(scores[assignment == 1], measured[assignment == 1])
