import json

import numpy as np
import polars as pl
import pytest

from pipeline.store import EmbeddingStore, StoreError, StoreInfo, shard_ranges


def _meta(uids, statuses):
    return [
        {"uid": u, "location": f"/x/{u}", "label": "a", "caption": None, "sha1": f"h{u}", "width": 8, "height": 8, "status": s}
        for u, s in zip(uids, statuses)
    ]


def _info(n_shards=2, dim=4, dtype="float16"):
    return StoreInfo(dim=dim, dtype=dtype, embedder={"kind": "test"}, source={"kind": "test"}, shard_size=3, n_shards=n_shards)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_round_trip_keeps_ok_rows_aligned(tmp_path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    e0, e1 = _unit(rng, 2, 4), _unit(rng, 3, 4)
    store.write_shard(0, e0, _meta(["a", "b", "c"], ["ok", "corrupt", "ok"]))
    store.write_shard(1, e1, _meta(["d", "e", "f"], ["ok", "ok", "ok"]))
    emb, meta = store.load()
    assert meta["uid"].to_list() == ["a", "c", "d", "e", "f"]
    np.testing.assert_allclose(emb, np.concatenate([e0, e1]), atol=1e-3)  # float16 storage
    assert store.all_meta().filter(pl.col("status") != "ok")["uid"].to_list() == ["b"]
    assert store.read_embeddings(0).dtype == np.float16
    assert isinstance(store.read_embeddings(0), np.memmap)


def test_incomplete_store_and_resume_settings(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    store.write_shard(0, _unit(np.random.default_rng(1), 1, 4), _meta(["a"], ["ok"]))
    with pytest.raises(StoreError, match="incomplete"):
        store.load()
    assert store.done_shards() == [0]
    store.init(_info())  # same settings: resuming is fine
    with pytest.raises(StoreError, match="dim"):
        store.init(_info(dim=8))


def test_rejects_bad_embeddings(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    bad = np.full((1, 4), np.nan, dtype=np.float32)
    with pytest.raises(StoreError, match="NaN"):
        store.write_shard(0, bad, _meta(["a"], ["ok"]))
    with pytest.raises(StoreError, match="ok rows"):
        store.write_shard(0, np.zeros((2, 4), np.float32), _meta(["a"], ["ok"]))
    assert not store.is_done(0)
    assert not list((tmp_path / "s" / "emb").iterdir())  # nothing half-written left behind


def test_detects_tampered_shard(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info(n_shards=1))
    store.write_shard(0, _unit(np.random.default_rng(2), 2, 4), _meta(["a", "b"], ["ok", "ok"]))
    np.save(store.emb_path(0), np.zeros((2, 5), np.float16))
    with pytest.raises(StoreError, match="do not match"):
        store.load()
    store.meta_path(0).write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="cannot read"):
        store.load()
    store.info_path.write_text("{")
    with pytest.raises(StoreError, match="JSON"):
        store.info()


def test_shard_ranges():
    assert shard_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_ranges(0, 3) == []
    with pytest.raises(ValueError):
        shard_ranges(5, 0)
