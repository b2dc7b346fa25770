"""Targeted selection through the flow: a pool of two domains, a target from one, and coreset weights."""
from __future__ import annotations

import numpy as np
import polars as pl

from flows.curate import run_curate
from pipeline.manifest import read_manifest, read_run_info


def _write_precomputed(folder, emb, uids, labels=None):
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", emb.astype(np.float32))
    meta = {"key": uids}
    if labels is not None:
        meta["label"] = labels
    pl.DataFrame(meta).write_parquet(folder / "metadata" / "metadata_0.parquet")
    return {"kind": "precomputed", "emb_paths": str(folder / "img_emb" / "*.npy"), "meta_paths": str(folder / "metadata" / "*.parquet")}


def test_ot_target_selects_the_target_domain_and_coreset_weights_fill_weight(prefect_server, tmp_path):
    rng = np.random.default_rng(0)
    d = 8
    shift = np.zeros(d)
    shift[0] = 4.0
    pool = np.concatenate([rng.normal(size=(300, d)) + shift, rng.normal(size=(300, d)) - shift])
    domain = np.array(["a"] * 300 + ["b"] * 300)
    labels = np.where(rng.random(600) < 0.5, "x", "y")
    uids = [f"{dom}{i:04d}" for i, dom in enumerate(domain)]
    target = rng.normal(size=(60, d)) + shift
    config = {
        "name": "ot",
        "source": {**_write_precomputed(tmp_path / "pool", pool, uids, labels), "label_column": "label"},
        "embed": {"kind": "precomputed", "dtype": "float32"},
        "index": {"k": 4},
        "steps": [
            {"scorer": "ot_target", "target": _write_precomputed(tmp_path / "target", target, [f"t{i}" for i in range(60)]),
             "keep_fraction": 0.3},
            {"scorer": "coreset_weight", "coreset_fraction": 0.2},
        ],
        "output_root": str(tmp_path / "runs"),
        "report": False,
    }
    run_curate(config)
    m = read_manifest(tmp_path / "runs" / "ot")
    kept = m.filter(pl.col("keep"))
    assert kept.height == 180
    assert kept["uid"].str.starts_with("a").mean() >= 0.95  # the target's domain
    assert (m.filter(~pl.col("keep"))["reason"] == "ot").all()
    assert abs(kept["weight"].mean() - 1.0) < 1e-4 and kept["weight"].std() > 0
    info = read_run_info(tmp_path / "runs" / "ot")
    assert info["steps"][0]["target_rows"] == 60 and info["steps"][0]["eps"] == 0.05


def test_ot_target_gradient_features_with_estimated_ratio(prefect_server, tmp_path):
    # Pool: domain a (30 %, classes cat/dog) and domain b (70 %, classes car/ship); target: unlabelled rows of domain a.
    rng = np.random.default_rng(1)
    d = 8
    n_a, n_b = 180, 420
    a = rng.normal(size=(n_a, d))
    a[:, 0] += 5.0
    b = rng.normal(size=(n_b, d))
    b[:, 1] += 5.0
    pool = np.concatenate([a, b])
    labels = np.concatenate([np.where(a[:, 2] > 0, "cat", "dog"), np.where(b[:, 2] > 0, "car", "ship")])
    uids = [f"a{i:04d}" for i in range(n_a)] + [f"b{i:04d}" for i in range(n_b)]
    target = rng.normal(size=(80, d))
    target[:, 0] += 5.0
    config = {
        "name": "otg",
        "source": {**_write_precomputed(tmp_path / "pool", pool, uids, labels), "label_column": "label"},
        "embed": {"kind": "precomputed", "dtype": "float32"},
        "index": {"k": 4},
        "steps": [
            {"scorer": "ot_target", "target": _write_precomputed(tmp_path / "target", target, [f"t{i}" for i in range(80)]),
             "estimate_ratio": True, "features": "gradient", "grad_dim": 64, "k_folds": 4},
        ],
        "output_root": str(tmp_path / "runs"),
        "report": False,
    }
    run_curate(config)
    m = read_manifest(tmp_path / "runs" / "otg")
    kept = m.filter(pl.col("keep"))
    info = read_run_info(tmp_path / "runs" / "otg")["steps"][0]
    assert info["features"] == "gradient" and info["grad_dim"] == 64
    assert info["target_labels"] == "predicted by the proxy head"
    assert 0.15 <= info["estimated_ratio"] <= 0.45  # true in-domain share 0.3
    assert kept.height == int(np.ceil(info["estimated_ratio"] * 600))
    # Gradient features are weaker domain evidence than embeddings (confidently classified rows of either domain all
    # have near-zero gradients), but the kept rows are still mostly the target's domain (30 % of the pool).
    assert kept["uid"].str.starts_with("a").mean() >= 0.75
    curve = info["ratio_curve"]
    assert len(curve["mean_ot_distance"]) == len(curve["neighbours_per_target"]) > 5
    assert m["score_ot"].is_not_null().all()
