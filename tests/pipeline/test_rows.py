"""The lazy store view (pipeline/rows.py) and the fan-out paths that use it: same numbers as the in-memory path."""
from __future__ import annotations

import pickle
import resource

import numpy as np
import polars as pl
import pytest

from pipeline import clustering, ok_rows
from pipeline.config import CurateConfig
from pipeline.index import KMeansParams, spherical_kmeans
from pipeline.rows import StoreRows
from pipeline.scoring import run_steps
from scorers.semdedup import cluster_batches
from scorers.step import ScoringContext
from pipeline.store import EmbeddingStore, StoreInfo


def _store(root, sizes=(300, 0, 250, 400), dim=16, seed=0, uid=lambda i: f"u{i:05d}", label=lambda i: None,
           sha1=str) -> EmbeddingStore:
    rng = np.random.default_rng(seed)
    store = EmbeddingStore(root)
    store.init(StoreInfo(dim=dim, dtype="float16", embedder={"kind": "test"}, source={"kind": "test"}, shard_size=400,
                         n_shards=len(sizes)))
    centres = rng.standard_normal((6, dim))
    start = 0
    for shard, n in enumerate(sizes):
        x = centres[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, dim))
        x[: n // 10] = x[n // 10 : 2 * (n // 10)] + 1e-3 * rng.standard_normal((n // 10, dim))  # near-duplicates
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        status = ["ok"] * n
        if n:
            status[-1] = "decode_error"  # a bad row: in the meta, not in the embeddings
        meta = pl.DataFrame({"uid": [uid(start + i) for i in range(n)], "location": [None] * n,
                             "label": [label(start + i) for i in range(n)],
                             "caption": [None] * n, "sha1": [sha1(start + i) for i in range(n)], "width": [8] * n,
                             "height": [8] * n, "status": status},
                            schema={"uid": pl.String, "location": pl.String, "label": pl.String, "caption": pl.String,
                                    "sha1": pl.String, "width": pl.Int32, "height": pl.Int32, "status": pl.String})
        store.write_shard(shard, x[: max(n - 1, 0)].astype(np.float16), meta)
        start += n
    return store


def test_store_rows_reads_like_the_loaded_array(tmp_path):
    store = _store(tmp_path / "s")
    loaded, meta = store.load()
    rows, ok = ok_rows.open_rows(store)
    assert rows.shape == loaded.shape and rows.dtype == np.float16 and len(ok) == meta.height
    assert np.array_equal(np.asarray(rows), loaded)
    rng = np.random.default_rng(1)
    idx = rng.integers(-len(loaded), len(loaded), 500)  # repeats, negatives, any order, across shards
    assert np.array_equal(rows[idx], loaded[idx])
    assert np.array_equal(rows[10:700:3], loaded[10:700:3])
    mask = rng.random(len(loaded)) < 0.3
    assert np.array_equal(rows[mask], loaded[mask])
    assert np.array_equal(rows[5], loaded[5]) and np.array_equal(rows[7:9, 2:4], loaded[7:9, 2:4])
    sub = rows.subset(np.array([900, 3, 451, 3]))
    assert np.array_equal(sub[[1, 3, 0]], loaded[[3, 3, 900]])
    again = pickle.loads(pickle.dumps(sub))  # travels to a worker as paths and indices
    assert np.array_equal(np.asarray(again), loaded[[900, 3, 451, 3]])
    with pytest.raises(IndexError):
        rows[[len(loaded)]]


def test_store_rows_memory_does_not_grow_with_what_was_read(tmp_path):
    """Positioned reads, no memory map: reading every row in chunks leaves nothing resident but the last chunk."""
    n, dim = 200_000, 256  # 100 MB of float16 on disk
    path = tmp_path / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))[:] = 1
    rows = StoreRows.open([path], dim=dim, dtype="float16")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    total = 0.0
    for s in range(0, n, 10_000):
        total += float(rows[s:s + 10_000].sum(dtype=np.float32))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert total == n * dim
    assert grown_mb < 40, f"peak RSS grew {grown_mb:.0f} MB while streaming 100 MB"


def test_sharded_index_equals_one_kmeans_and_is_reused(tmp_path):
    store = _store(tmp_path / "s")
    cfg = CurateConfig.model_validate({"source": {"kind": "image_folder", "root": "x"}, "index": {"k": 6, "seed": 3}})
    rows, _ = ok_rows.open_rows(store)
    calls = []

    def recording_fan_out(fn, items):
        calls.append((fn.__name__, len(items)))
        return [fn(**item) for item in items]

    sharded = clustering.fit_index(cfg, store, rows, fan_out=recording_fan_out)
    whole = spherical_kmeans(store.load()[0], KMeansParams(k=6, seed=3))
    assert calls == [("assign_shard", 4)]  # one task per store shard, the empty one included
    assert np.array_equal(sharded.centroids, whole.centroids)
    assert np.array_equal(sharded.assignment, whole.assignment)
    assert np.array_equal(sharded.similarity, whole.similarity)
    saved = sorted((store.root / "index").glob("assign-*/*.npz"))
    stamps = [p.stat().st_mtime_ns for p in saved]
    assert clustering.assign_shard(store.root, 0, sharded.centroids, saved[0].parent.name.removeprefix("assign-")) == 0
    clustering.fit_index(cfg, store, rows)  # a rerun: cached centroids, no shard reassigned
    assert [p.stat().st_mtime_ns for p in saved] == stamps


def test_cluster_batches_are_whole_clusters_with_balanced_work():
    rng = np.random.default_rng(0)
    clusters = rng.choice(20, 5000, p=np.r_[0.3, np.full(19, 0.7 / 19)])
    batches = cluster_batches(clusters, 4)
    assert len(batches) == 4
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(5000))
    homes = [set(clusters[b].tolist()) for b in batches]
    assert all(a.isdisjoint(b) for i, a in enumerate(homes) for b in homes[i + 1 :])
    work = [float(np.sum(np.bincount(clusters[b]) ** 2.0)) for b in batches]
    # greedy largest-first is within 4/3 of the best split, which is at least the mean and the biggest cluster's work
    assert max(work) <= 4 / 3 * max(np.mean(work), np.bincount(clusters).max() ** 2.0)


def test_ok_rows_hold_uid_ranks_shared_labels_and_a_uid_file(tmp_path):
    rng = np.random.default_rng(5)
    names = [f"{rng.integers(0, 10**6):06d}-{i}" for i in range(1000)]  # string order unrelated to row order
    store = _store(tmp_path / "s", uid=lambda i: names[i], label=lambda i: None if i % 7 == 0 else f"class{i % 3}")
    _, meta = store.load()
    _, ok = ok_rows.open_rows(store)
    uids = meta["uid"].to_numpy().astype(str)
    assert np.array_equal(ok.uid_rank, np.argsort(np.argsort(uids, kind="stable"), kind="stable"))
    assert ok.ok_counts == [299, 0, 249, 399] and ok.bounds(2) == (299, 548) and ok.bad_rows == 3
    assert ok.labels.tolist() == meta["label"].to_list()
    assert len({id(x) for x in ok.labels if x is not None}) == 3  # one object per distinct label
    picks = np.array([546, 0, 946, 546, 300])
    assert ok_rows.uids_at(ok.uid_file, picks) == uids[picks].tolist()
    assert ok_rows.shared_strings(pl.Series([None, None], dtype=pl.String)) is None


def test_steps_given_uid_ranks_decide_exactly_as_given_uid_strings(tmp_path):
    """The flow hands the scorers int64 uid ranks instead of strings: every tie-break (exact_dup's original,
    SemDeDup's kept member, DBP's equal distances) must come out the same."""
    rng = np.random.default_rng(9)
    names = [f"{rng.integers(0, 10**6):06d}-{i}" for i in range(1000)]
    store = _store(tmp_path / "s", uid=lambda i: names[i], label=lambda i: f"class{i % 3}", sha1=lambda i: str(i % 900))
    emb, meta = store.load()
    _, ok = ok_rows.open_rows(store)
    kmeans = spherical_kmeans(emb, KMeansParams(k=6, seed=3))
    steps = [("exact_dup", {}), ("semdedup", {"eps": 0.002}), ("dbp", {"keep_fraction": 0.3, "keep": "easy"}),
             ("prototype", {"keep_fraction": 0.2})]

    def run(uids, labels):
        ctx = ScoringContext(emb=emb, uids=uids, labels=labels, sha1=meta["sha1"].to_numpy().astype(object), kmeans=kmeans,
                             alive=np.ones(len(meta), bool), n_scorable=len(meta))
        return run_steps(ctx, steps)

    by_string, notes = run(meta["uid"].to_numpy().astype(object), meta["label"].to_numpy().astype(object))
    by_rank, _ = run(ok.uid_rank, ok.labels)
    assert [n["dropped"] for n in notes][:2] != [0, 0]
    for name, values in by_string.items():
        assert np.array_equal(np.asarray(values), np.asarray(by_rank[name]), equal_nan=values.dtype.kind == "f"), name


@pytest.mark.parametrize("lazy", [False, True])
def test_fanned_out_semdedup_and_dbp_equal_the_single_call(tmp_path, lazy):
    store = _store(tmp_path / "s")
    rows, _ = ok_rows.open_rows(store)
    meta = store.load()[1]
    emb = rows if lazy else store.load()[0]
    kmeans = spherical_kmeans(store.load()[0], KMeansParams(k=6, seed=3))
    steps = [("semdedup", {"eps": 0.002, "eps_grid": [0.0005, 0.002, 0.05]}), ("dbp", {"keep_fraction": 0.4}), ("prototype", {})]

    def run(fan_out, batches):
        ctx = ScoringContext(emb=emb, uids=meta["uid"].to_numpy().astype(object), labels=None,
                             sha1=meta["sha1"].to_numpy().astype(object), kmeans=kmeans, alive=np.ones(len(meta), bool),
                             n_scorable=len(meta), fan_out=fan_out, cluster_batches=batches)
        return run_steps(ctx, steps)

    tasks = []

    def fan_out(fn, items):
        tasks.append(len(items))
        return [fn(**pickle.loads(pickle.dumps(item))) for item in items]  # as a process worker receives them

    serial_cols, serial_notes = run(None, 1)
    fanned_cols, fanned_notes = run(fan_out, 3)
    assert tasks == [3]
    assert serial_notes[0]["dropped"] > 0 and serial_notes[0]["kept_by_eps"] == fanned_notes[0]["kept_by_eps"]
    for name, values in serial_cols.items():
        assert np.array_equal(np.asarray(values), np.asarray(fanned_cols[name]), equal_nan=values.dtype.kind == "f"), name
