"""The precomputed source's per-file uid-hash cache (#15): a grown source reads only its new or changed metadata files,
and the uid-uniqueness check stays exact. Real .npy and Parquet files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.sources as sources
from pipeline.sources import DuplicateUidError, PrecomputedSource
from pipeline.uid_cache import CACHE_VERSION, CHECKED_FILE, INDEX_FILE, UidHashCache


def _write(root: Path, name: str, keys: list[str], *, label: str | None = None) -> None:
    (root / "emb").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    np.save(root / "emb" / f"{name}.npy", np.random.default_rng(len(keys)).standard_normal((len(keys), 4)).astype(np.float32))
    cols = {"key": keys, "label": pa.array([label] * len(keys), pa.string())}
    pq.write_table(pa.table(cols), root / "meta" / f"{name}.parquet")


def _source(root: Path, **kw) -> PrecomputedSource:
    return PrecomputedSource(str(root / "emb" / "*.npy"), str(root / "meta" / "*.parquet"), **kw)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The metadata files the source reads (every read of a table goes through sources._read_table)."""
    seen: list[str] = []
    real = sources._read_table

    def counting(path: str, columns: list[str]):
        seen.append(os.path.basename(path))
        return real(path, columns)

    monkeypatch.setattr(sources, "_read_table", counting)
    return seen


def test_grown_source_reads_only_new_and_changed_files(tmp_path: Path, reads: list[str]) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    for f in range(3):
        _write(data, f"f{f}", [f"u{f}_{i}" for i in range(50)])
    assert _source(data).scan_shards(cache_dir=cache) == [50, 50, 50]
    assert sorted(reads) == ["f0.parquet", "f1.parquet", "f2.parquet"]
    reads.clear()
    assert _source(data).scan_shards(cache_dir=cache) == [50, 50, 50]  # nothing changed: nothing read
    assert reads == []
    _write(data, "f3", [f"u3_{i}" for i in range(20)])  # an increment
    assert _source(data).scan_shards(cache_dir=cache) == [50, 50, 50, 20]
    assert reads == ["f3.parquet"]
    reads.clear()
    _write(data, "f1", [f"u1_{i}" for i in range(40)], label="x")  # a rewritten file: new size and mtime
    src = _source(data, label_column="label")
    assert src.scan_shards(cache_dir=cache) == [50, 40, 50, 20] and src.has_labels()
    assert sorted(set(reads)) == ["f0.parquet", "f1.parquet", "f2.parquet", "f3.parquet"]  # another column read: new key
    reads.clear()
    src = _source(data, label_column="label")
    assert src.scan_shards(cache_dir=cache) == [50, 40, 50, 20] and src.has_labels() and reads == []
    (data / "emb" / "f0.npy").unlink()
    (data / "meta" / "f0.parquet").unlink()
    assert _source(data, label_column="label").scan_shards(cache_dir=cache) == [40, 50, 20] and reads == []
    assert len([p for p in cache.glob("*.npy") if p.name != CHECKED_FILE]) == 3  # the removed file's entry is deleted
    # the same result as without a cache
    assert _source(data, label_column="label").scan_shards() == [40, 50, 20]


def test_a_duplicate_in_a_new_file_is_found_against_cached_files(tmp_path: Path, reads: list[str]) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write(data, "f0", [f"a{i}" for i in range(30)])
    _write(data, "f1", [f"b{i}" for i in range(30)])
    _source(data).scan_shards(cache_dir=cache)
    reads.clear()
    _write(data, "f2", ["c0", "b17", "c1", "c1"])  # repeats a uid of a cached file, and one of its own
    with pytest.raises(DuplicateUidError, match="2 uid.*'b17'.*'c1'|2 uid.*'c1'.*'b17'") as err:
        _source(data).scan_shards(cache_dir=cache)
    assert sorted(err.value.duplicates) == ["b17", "c1"]
    assert "f0.parquet" not in reads  # only the files holding a repeated hash are read again, for the exact compare
    # a failed scan records nothing: fixing the new file lists it, the cached files still unread
    reads.clear()
    _write(data, "f2", ["c0", "c1"])
    assert _source(data).scan_shards(cache_dir=cache) == [30, 30, 2] and reads == ["f2.parquet"]


def test_damaged_cache_is_a_full_read(tmp_path: Path, reads: list[str]) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write(data, "f0", ["a", "b"])
    _write(data, "f1", ["c", "d", "e"])
    _source(data).scan_shards(cache_dir=cache)
    next(p for p in cache.glob("*.npy") if p.name != CHECKED_FILE).write_bytes(b"not an array")
    reads.clear()
    assert _source(data).scan_shards(cache_dir=cache) == [2, 3] and reads == []  # nothing changed: the entry is not needed
    (cache / CHECKED_FILE).write_bytes(b"damaged too")
    assert _source(data).scan_shards(cache_dir=cache) == [2, 3] and len(reads) == 1  # full check: the damaged entry's file
    (cache / INDEX_FILE).write_text("{not json")
    reads.clear()
    assert _source(data).scan_shards(cache_dir=cache) == [2, 3] and len(reads) == 2
    assert json.loads((cache / INDEX_FILE).read_text())["v"] == CACHE_VERSION  # rewritten


def test_duplicates_between_cached_files_are_found_without_a_verified_record(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write(data, "f0", ["a", "b"])
    _source(data).scan_shards(cache_dir=cache)
    _write(data, "f1", ["c", "a"])
    other = tmp_path / "other"  # f1 cached alone, in another cache folder, then copied in: never checked with f0
    PrecomputedSource(str(data / "emb" / "f1.npy"), str(data / "meta" / "f1.parquet")).scan_shards(cache_dir=other)
    name = next(other.glob("*.npy")).name
    (cache / name).write_bytes((other / name).read_bytes())
    index = json.loads((cache / INDEX_FILE).read_text())
    index["entries"][name[:-4]] = json.loads((other / INDEX_FILE).read_text())["entries"][name[:-4]]
    (cache / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DuplicateUidError, match="'a'"):
        _source(data).scan_shards(cache_dir=cache)


def test_unchanged_files_cache_entries_are_not_read_either(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    for f in range(4):
        _write(data, f"f{f}", [f"u{f}_{i}" for i in range(25)])
    _source(data).scan_shards(cache_dir=cache)
    checked = np.load(cache / CHECKED_FILE)
    assert len(checked) == 100 and (np.diff(checked.astype(np.float64)) >= 0).all()
    opened: list[str] = []
    real = UidHashCache.hashes

    def counting(self, name):
        opened.append(name)
        return real(self, name)

    monkeypatch.setattr(UidHashCache, "hashes", counting)
    _write(data, "f4", [f"u4_{i}" for i in range(10)])
    (data / "emb" / "f2.npy").unlink()
    (data / "meta" / "f2.parquet").unlink()
    assert _source(data).scan_shards(cache_dir=cache) == [25, 25, 25, 10]
    assert len(opened) == 1  # the gone file's entry, to take its hashes out; none of the unchanged files'
    assert len(np.load(cache / CHECKED_FILE)) == 85
    with pytest.raises(DuplicateUidError, match="'u3_7'"):  # still exact against the unchanged files
        _write(data, "f5", ["u3_7"])
        _source(data).scan_shards(cache_dir=cache)


def test_a_scan_stopped_between_writes_is_a_full_check(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write(data, "f0", ["a", "b"])
    _write(data, "f1", ["c", "d"])
    _source(data).scan_shards(cache_dir=cache)
    np.save(cache / CHECKED_FILE, np.sort(np.array([1, 2, 3, 4], dtype=np.uint64)))  # not what the index recorded
    _write(data, "f2", ["a"])
    with pytest.raises(DuplicateUidError, match="'a'"):
        _source(data).scan_shards(cache_dir=cache)
