"""A per-file cache of a precomputed source's uid hashes, so that listing a grown source reads only new or changed files.

The uid-uniqueness check of ``PrecomputedSource.scan_shards`` needs every file's uids. The cache keeps, per file pair,
the sorted 64-bit hashes of its uids (8 bytes a row, ``<name>.npy``, memory-mapped when read) plus its row count and
whether it has labels, under a name derived from the files' paths, sizes and mtimes (and the columns read and the
polars version, whose string hash is only stable within one version). A file that changes gets a new name, so a stale
entry is never used. ``index.json`` records the entries and the set of names whose files were last checked unique
together; a file set that is a subset of it needs no check among its own members, only against the new files.
Entries are written only after a scan succeeded; a lost or damaged cache only costs a full read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_path, atomic_write_text

INDEX_FILE = "index.json"
CACHE_VERSION = 1


def file_stamp(path: str) -> list[int]:
    """[size, mtime_ns] of a file; [-1, -1] when it cannot be stat'ed (then it is read, and fails there)."""
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [int(st.st_size), int(st.st_mtime_ns)]


def entry_name(paths: list[str], extra: dict[str, Any]) -> str:
    """The cache name of one file pair: a hash of its paths, their sizes and mtimes, and `extra` (columns read)."""
    import polars as pl

    key = {"v": CACHE_VERSION, "polars": pl.__version__, "paths": paths, "stamps": [file_stamp(p) for p in paths], **extra}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class UidHashCache:
    """The cache folder of one source (``folder`` None: no cache, every lookup misses and nothing is written)."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._entries: dict[str, dict[str, Any]] = {}
        self._verified: set[str] = set()
        self._fresh: dict[str, np.ndarray] = {}
        if self.folder is not None and (self.folder / INDEX_FILE).is_file():
            try:
                index = json.loads((self.folder / INDEX_FILE).read_text())
                if index.get("v") == CACHE_VERSION:
                    self._entries = {str(k): dict(v) for k, v in index["entries"].items()}
                    self._verified = set(index["verified"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries, self._verified = {}, set()  # unreadable: treated as empty, rewritten after the scan

    def lookup(self, name: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(sorted uid hashes, memory-mapped; {"rows", "labelled"}) of a cached file pair, or None."""
        entry = self._entries.get(name)
        if self.folder is None or entry is None:
            return None
        try:
            hashes = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if hashes.dtype != np.uint64 or hashes.ndim != 1 or len(hashes) != entry.get("rows"):
            return None
        return hashes, entry

    def add(self, name: str, sorted_hashes: np.ndarray, *, rows: int, labelled: bool) -> None:
        """Stages one file pair's entry; written by commit()."""
        self._entries[name] = {"rows": int(rows), "labelled": bool(labelled)}
        self._fresh[name] = sorted_hashes

    def verified(self) -> set[str]:
        """Names whose files were checked unique together by the last successful scan."""
        return set(self._verified)

    def commit(self, names: list[str]) -> None:
        """After a successful scan of exactly `names`: writes the staged entries, records `names` as checked together
        and deletes the entries of files no longer listed."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, hashes in self._fresh.items():
            if name in names:
                with atomic_path(self.folder / f"{name}.npy") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, np.ascontiguousarray(hashes, dtype=np.uint64))
        keep = set(names)
        index = {"v": CACHE_VERSION, "entries": {n: self._entries[n] for n in names}, "verified": sorted(keep)}
        atomic_write_text(self.folder / INDEX_FILE, json.dumps(index, sort_keys=True))
        for path in self.folder.glob("*.npy"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
        self._fresh.clear()
        self._entries, self._verified = index["entries"], keep
