"""Growing stores: catalog generations, tombstones, compaction, embedder identity, change detection."""
import os

import numpy as np
import polars as pl
import pytest

from pipeline.changes import compare, plan_image_increment, plan_precomputed_increment, row_fingerprints
from pipeline.sources import ImageFolderSource, PrecomputedSource
from pipeline.store import EmbeddingStore, StoreError, StoreInfo, identity_differences


def _info(**kw):
    base = dict(dim=4, dtype="float32", embedder={"kind": "pixels", "dim": 4, "preprocessing": {"size": 16}, "versions": {"torch": "1"}},
                source={"kind": "test"}, shard_size=3, n_shards=0)
    return StoreInfo(**{**base, **kw})


def _meta(uids):
    return [{"uid": u, "location": f"/x/{u}", "label": None, "caption": None, "sha1": f"h{u}", "width": 8, "height": 8,
             "status": "ok", "size": 1, "mtime_ns": 1} for u in uids]


def _unit(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identity_differences_name_the_setting():
    old = {"dim": 64, "dtype": "float16", "embedder": {"kind": "pixels", "preprocessing": {"size": 16}, "versions": {"torch": "1"}},
           "source": {"kind": "image_folder", "root": "/a"}}
    new = {**old, "embedder": {"kind": "pixels", "preprocessing": {"size": 16}, "versions": {"torch": "2"}}}
    assert identity_differences(old, new) == []  # a library upgrade is no new embedding space
    new = {**old, "dim": 32}
    assert identity_differences(old, new) == ["dim: 64 → 32"]
    new = {**old, "embedder": {"kind": "pixels", "preprocessing": {"size": 8}}}
    assert identity_differences(old, new) == ["embedder.preprocessing.size: 16 → 8"]
    new = {**old, "source": {"kind": "precomputed", "emb_paths": ["x"]}, }
    assert "source.kind" in identity_differences(old, new)[0]


def test_store_refuses_other_embedder_but_accepts_growth(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info(n_shards=2))
    store.init(_info(n_shards=5, shard_size=7))  # more shards, another shard size: the same embedding space
    assert store.info().n_shards == 5
    with pytest.raises(StoreError, match=r"embedder\.preprocessing\.size: 16 → 32"):
        store.init(_info(embedder={"kind": "pixels", "dim": 4, "preprocessing": {"size": 32}}))
    with pytest.raises(StoreError, match="dtype: float32 → float16"):
        store.init(_info(dtype="float16"))


def test_tombstones_and_compaction(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    e0, e1 = _unit(3, 0), _unit(3, 1)
    store.write_shard(0, e0, _meta(["a", "b", "c"]))
    store.write_shard(1, e1, _meta(["d", "e", "f"]))
    store.commit(shards=[0, 1], dead=np.array([(0 << 32) | 1, (1 << 32) | 0], np.int64), next_shard=2)
    emb, meta = store.load()
    assert meta["uid"].to_list() == ["a", "c", "e", "f"]
    np.testing.assert_array_equal(emb, np.concatenate([e0[[0, 2]], e1[[1, 2]]]))
    assert store.all_meta()["uid"].to_list() == ["a", "c", "e", "f"]
    before = store.fingerprint()
    result = store.compact()
    assert result["shards_rewritten"] == 2 and result["rows_removed"] == 2
    assert store.shards() == [2, 3] and len(store.dead_codes()) == 0
    emb2, meta2 = store.load()
    assert meta2["uid"].to_list() == ["a", "c", "e", "f"]
    np.testing.assert_array_equal(emb2, emb)
    assert not store.emb_path(0).exists() and not store.done_path(1).exists()
    assert store.fingerprint() != before
    assert store.compact()["shards_rewritten"] == 0  # nothing left to do


def test_compaction_resumes_after_a_kill(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    for shard in range(3):
        store.write_shard(shard, _unit(3, shard), _meta([f"{shard}{c}" for c in "abc"]))
    store.commit(shards=[0, 1, 2], dead=np.array([(s << 32) | 0 for s in range(3)], np.int64), next_shard=3)
    written = []
    real = EmbeddingStore.write_shard

    def dying(self, shard, emb, meta, **kwargs):
        if written:
            raise KeyboardInterrupt("killed")  # a kill after the first rewritten shard
        written.append(shard)
        return real(self, shard, emb, meta, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.setattr(EmbeddingStore, "write_shard", real)
    assert store.shards() == [0, 1, 2]  # the old generation still in force
    assert store.load()[1]["uid"].to_list() == ["0b", "0c", "1b", "1c", "2b", "2c"]
    mtime = store.done_path(3).stat().st_mtime_ns
    store.compact()
    assert store.done_path(3).stat().st_mtime_ns == mtime  # the shard rewritten before the kill is reused
    assert store.shards() == [3, 4, 5]
    assert store.load()[1]["uid"].to_list() == ["0b", "0c", "1b", "1c", "2b", "2c"]


def test_v1_store_is_read_and_upgraded(tmp_path):
    import json

    store = EmbeddingStore(tmp_path / "s")
    store.init(_info(n_shards=1))
    store.write_shard(0, _unit(2), _meta(["a", "b"]))
    raw = json.loads(store.info_path.read_text())
    raw["format_version"] = 1
    store.info_path.write_text(json.dumps(raw))
    assert store.load()[1]["uid"].to_list() == ["a", "b"]  # readable as it is
    store.init(_info(n_shards=1))
    assert store.catalog()["shards"] == [0] and store.info().n_shards == 1
    raw["format_version"] = 0
    store.info_path.write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="delete the store and embed again"):
        store.info()


def _folder(root, names, payload=b"x"):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload + name.encode())


def test_image_change_detection(tmp_path):
    """50 added, 3 deleted, 3 rewritten (one only touched: same bytes, new mtime): the plan says exactly that."""
    root = tmp_path / "imgs"
    names = [f"{i:03d}.jpg" for i in range(20)]
    _folder(root, names)
    source = ImageFolderSource(root)
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    inc = plan_image_increment(store, source, source.refs(), shard_size=8)
    assert inc.counts == {"new": 20, "changed": 0, "removed": 0, "unchanged": 0, "hashed": 0}
    assert [len(j.rows) for j in inc.jobs] == [8, 8, 4]
    _write_jobs(store, source, inc)
    inc.commit(store)

    for name in names[:3]:
        (root / name).unlink()
    (root / names[5]).write_bytes(b"rewritten 5")
    (root / names[6]).write_bytes(b"rewritten six, longer")
    os.utime(root / names[7], ns=(1, 1))  # touched, same content
    _folder(root, [f"new/{i:03d}.jpg" for i in range(5)])
    source = ImageFolderSource(root)
    inc = plan_image_increment(store, source, source.refs(), shard_size=8)
    assert inc.counts == {"new": 5, "changed": 2, "removed": 3, "unchanged": 15, "hashed": 3}
    refs = source.refs()
    assert sorted(refs[i].uid for j in inc.jobs for i in j.rows) == sorted([names[5], names[6], *[f"new/{i:03d}.jpg" for i in range(5)]])
    assert [j.shard for j in inc.jobs] == [3]
    _write_jobs(store, source, inc)
    inc.commit(store)
    uids = store.all_meta()["uid"].to_list()
    assert sorted(uids) == sorted(r.uid for r in refs)  # removed rows gone, changed ones once
    again = plan_image_increment(store, source, source.refs(), shard_size=8)
    assert again.counts["unchanged"] == len(refs) and again.counts["hashed"] == 1  # the touched file is hashed again, not embedded
    assert not again.jobs


def _write_jobs(store, source, inc):
    from pipeline.decode import sha1_hex

    refs = source.refs()
    for job in inc.jobs:
        meta = []
        for i in job.rows:
            ref = refs[i]
            row = inc.listing.row(int(i), named=True)
            meta.append({"uid": ref.uid, "location": ref.location, "label": None, "caption": None,
                         "sha1": sha1_hex(source.read_bytes(ref)), "width": 1, "height": 1, "status": "ok",
                         "size": row["size"], "mtime_ns": row["mtime_ns"]})
        store.write_shard(job.shard, _unit(len(meta), job.shard), meta, tag=job.tag)


def test_compare_is_columnar_and_null_safe():
    listing = pl.DataFrame({"uid": ["a", "b", "c"], "size": [1, 2, -1], "mtime_ns": [5, 6, -1]})
    stored = pl.DataFrame({"uid": ["a", "b", "d", "c"], "sha1": ["x"] * 4, "size": [1, 3, 1, None], "mtime_ns": [5, 6, 1, None],
                           "code": [0, 1, 2, 3]})
    states = dict(compare(listing, stored).select("uid", "state").iter_rows())
    assert states == {"a": "unchanged", "b": "candidate", "c": "candidate", "d": "removed"}


def test_row_fingerprints():
    x = _unit(100)
    h = row_fingerprints(x)
    assert len(np.unique(h)) == 100
    y = x.copy()
    y[7, 3] = np.nextafter(y[7, 3], 2)  # one ulp
    assert (row_fingerprints(y) != h).sum() == 1
    assert row_fingerprints(np.zeros((2, 3), np.float16)).shape == (2,)  # rows not a multiple of 8 bytes


def _write_pre(root, name, uids, seed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "emb").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    np.save(root / "emb" / f"{name}.npy", _unit(len(uids), seed))
    pq.write_table(pa.table({"key": uids}), root / "meta" / f"{name}.parquet")


def test_precomputed_change_detection_reads_only_touched_files(tmp_path):
    root = tmp_path / "pre"
    _write_pre(root, "0", [f"a{i}" for i in range(10)], 0)
    _write_pre(root, "1", [f"b{i}" for i in range(10)], 1)
    source = PrecomputedSource(str(root / "emb" / "*.npy"), str(root / "meta" / "*.parquet"))
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    inc = plan_precomputed_increment(store, source)
    assert inc.counts == {"new": 20, "changed": 0, "removed": 0, "unchanged": 0, "hashed": 20}
    for job in inc.jobs:
        frame = source.shard_frame(job.file)[job.rows.tolist()]
        from pipeline.changes import file_fingerprints, fingerprint_hex
        sha = fingerprint_hex(file_fingerprints(source.emb_paths[job.file])[job.rows])
        meta = frame.with_columns(sha, pl.lit(0).alias("width"), pl.lit(0).alias("height"), pl.lit("ok").alias("status"))
        emb = np.load(source.emb_paths[job.file])[job.rows]
        store.write_shard(job.shard, emb, meta, tag=job.tag)
    inc.commit(store)
    # file 1 rewritten: b0 removed, b1 changed, b2..b9 the same; a new file 2 with 4 rows
    emb1 = np.load(root / "emb" / "1.npy")
    emb1[1] = _unit(1, 9)[0]
    import pyarrow as pa
    import pyarrow.parquet as pq
    np.save(root / "emb" / "1.npy", emb1[1:])
    pq.write_table(pa.table({"key": [f"b{i}" for i in range(1, 10)]}), root / "meta" / "1.parquet")
    _write_pre(root, "2", [f"c{i}" for i in range(4)], 2)
    source = PrecomputedSource(str(root / "emb" / "*.npy"), str(root / "meta" / "*.parquet"))
    inc = plan_precomputed_increment(store, source)
    assert inc.counts == {"new": 4, "changed": 1, "removed": 1, "unchanged": 18, "hashed": 13}  # file 0 never read
    assert [(j.file, j.rows.tolist()) for j in inc.jobs] == [(1, [0]), (2, [0, 1, 2, 3])]


def test_caption_embeddings_follow_tombstones_and_compaction(tmp_path):
    """load_text gives load()'s rows: tombstoned rows leave both, and compaction carries the captions along."""
    store = EmbeddingStore(tmp_path / "s")
    store.init(_info())
    for shard in range(2):
        emb = _unit(3, shard)
        store.write_shard(shard, emb, _meta([f"{shard}{c}" for c in "abc"]), text_embeddings=-emb)
    store.commit(shards=[0, 1], dead=np.array([(1 << 32) | 1], np.int64), next_shard=2)
    emb, meta = store.load(dtype="float32")
    assert meta["uid"].to_list() == ["0a", "0b", "0c", "1a", "1c"]
    np.testing.assert_array_equal(store.load_text(), -emb)
    store.compact()
    emb_after, meta_after = store.load(dtype="float32")
    assert meta_after["uid"].to_list() == meta["uid"].to_list()
    np.testing.assert_array_equal(store.load_text(), -emb_after)
