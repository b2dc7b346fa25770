"""Precomputed embeddings into a store: listed file by file (no per-sample refs), copied per file with bad rows kept as meta."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import fill_store, ingest
from pipeline.config import CurateConfig
from pipeline.sources import DuplicateUidError


def _write(folder: Path, files: list[np.ndarray], labels: bool) -> dict:
    (folder / "emb").mkdir(parents=True)
    (folder / "meta").mkdir()
    start = 0
    for i, x in enumerate(files):
        np.save(folder / "emb" / f"{i:03d}.npy", x)
        keys = [f"k{start + r:04d}" for r in range(len(x))]
        cols = {"key": keys, **({"label": [f"c{r % 2}" for r in range(len(x))]} if labels else {})}
        pq.write_table(pa.table(cols), folder / "meta" / f"{i:03d}.parquet")
        start += len(x)
    return {"kind": "precomputed", "emb_paths": str(folder / "emb" / "*.npy"), "meta_paths": str(folder / "meta" / "*.parquet"),
            **({"label_column": "label"} if labels else {})}


def test_plan_lists_sizes_and_the_copy_keeps_bad_rows_as_meta(tmp_path):
    rng = np.random.default_rng(0)
    files = [rng.standard_normal((5, 4)).astype(np.float16), rng.standard_normal((3, 4)).astype(np.float16)]
    files[0][1] = 0.0  # a zero vector cannot be normalised
    files[1][2, 3] = np.nan
    cfg = CurateConfig.model_validate({"source": _write(tmp_path / "pre", files, labels=True), "embed": {"kind": "precomputed"},
                                       "index": {"k": 2}, "store_dir": str(tmp_path / "store"), "output_root": str(tmp_path / "runs")})
    plan = ingest.plan_ingest(cfg)
    assert plan.refs == [] and plan.shards == [(0, 5), (5, 8)] and plan.n_samples == 8 and plan.has_labels
    store = fill_store.ingest_precomputed(cfg, plan)
    emb, _ = store.load()
    meta = store.all_meta()
    assert meta["uid"].to_list() == [f"k{i:04d}" for i in range(8)]
    assert meta["status"].to_list() == ["ok", "bad_embedding", "ok", "ok", "ok", "ok", "ok", "bad_embedding"]
    assert meta["location"][0].endswith("000.npy#0") and meta["label"].to_list()[:3] == ["c0", "c1", "c0"]
    good = np.concatenate([files[0][[0, 2, 3, 4]], files[1][:2]]).astype(np.float32)
    expected = (good / np.linalg.norm(good, axis=1, keepdims=True)).astype(np.float16)
    assert emb.dtype == np.float16 and np.array_equal(emb, expected)
    assert fill_store.ingest_precomputed_shard(plan.source, store.root, 0) == {"skipped": 1}


def test_plan_without_labels_and_with_a_repeated_uid(tmp_path):
    files = [np.ones((2, 4), np.float16), np.ones((2, 4), np.float16)]
    spec = _write(tmp_path / "pre", files, labels=False)
    cfg = CurateConfig.model_validate({"source": spec, "embed": {"kind": "precomputed"}, "index": {"k": 2}})
    assert not ingest.plan_ingest(cfg).has_labels
    pq.write_table(pa.table({"key": ["k0003", "k0001"]}), tmp_path / "pre" / "meta" / "001.parquet")
    with pytest.raises(DuplicateUidError, match="'k0001'"):
        ingest.plan_ingest(cfg)
    assert pl.read_parquet(tmp_path / "pre" / "meta" / "000.parquet")["key"].to_list() == ["k0000", "k0001"]
