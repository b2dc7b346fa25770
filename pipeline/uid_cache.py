"""A per-file cache of a precomputed source's uid hashes, so that listing a grown source reads only new or changed files.

The uid-uniqueness check of ``PrecomputedSource.scan_shards`` needs every file's uids. The cache keeps, per file pair,
the sorted 64-bit hashes of its uids (8 bytes a row, ``<name>.npy``) plus its row count and whether it has labels, under
a name derived from the files' paths, sizes and mtimes (and the columns read and the polars version, whose string hash
is only stable within one version). A file that changes gets a new name, so a stale entry is never used.
``index.json`` records the entries and the names whose files the last successful scan checked unique together;
``checked.npy`` holds those files' hashes as one sorted array. The next scan takes that array, removes the hashes of
files changed or gone since (their old entries), looks the new files' hashes up in it by binary search and merges them
in: unchanged files are not read at all, neither their metadata nor their cache entries.
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
CHECKED_FILE = "checked.npy"
CACHE_VERSION = 2


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


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.uint64))


class UidHashCache:
    """The cache folder of one source (``folder`` None: no cache, every lookup misses and nothing is written)."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._entries: dict[str, dict[str, Any]] = {}
        self._verified: list[str] = []
        self._checked_stamp: list[int] = [-1, -1]  # checked.npy's size and mtime as the index recorded them
        self._fresh: dict[str, np.ndarray] = {}
        if self.folder is not None and (self.folder / INDEX_FILE).is_file():
            try:
                index = json.loads((self.folder / INDEX_FILE).read_text())
                if index.get("v") == CACHE_VERSION:
                    self._entries = {str(k): {"rows": int(v["rows"]), "labelled": bool(v["labelled"])}
                                     for k, v in index["entries"].items()}
                    self._verified = [str(n) for n in index["verified"]]
                    self._checked_stamp = [int(x) for x in index["checked_stamp"]]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries, self._verified = {}, []  # unreadable: treated as empty, rewritten after the scan

    def lookup(self, name: str) -> dict[str, Any] | None:
        """{"rows", "labelled"} of a cached file pair (its hashes are read only if needed: hashes()), or None."""
        if self.folder is None or name not in self._entries or not (self.folder / f"{name}.npy").is_file():
            return None
        return self._entries[name]

    def hashes(self, name: str) -> np.ndarray | None:
        """The sorted uid hashes of a cached or staged entry, None when its file is missing or damaged."""
        if name in self._fresh:
            return self._fresh[name]
        entry = self._entries.get(name)
        if self.folder is None or entry is None:
            return None
        try:
            hashes = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if hashes.dtype != np.uint64 or hashes.ndim != 1 or len(hashes) != entry["rows"]:
            return None
        return hashes

    def add(self, name: str, sorted_hashes: np.ndarray, *, rows: int, labelled: bool) -> None:
        """Stages one file pair's entry; written by commit()."""
        self._entries[name] = {"rows": int(rows), "labelled": bool(labelled)}
        self._fresh[name] = sorted_hashes

    def checked(self, names: list[str]) -> tuple[np.ndarray, list[str]] | None:
        """When every name not staged by add() was among the files the last scan checked unique together: the sorted
        hashes of the files that are still listed (checked.npy minus the entries of the files changed or gone since),
        and the names of those gone. None otherwise, or when a needed file is missing or damaged (then: a full check)."""
        if self.folder is None or self._checked_stamp != file_stamp(str(self.folder / CHECKED_FILE)):
            return None  # none yet, or not the file the index recorded (a scan stopped between the two writes)
        verified = set(self._verified)
        if not {n for n in names if n not in self._fresh} <= verified:
            return None
        try:
            checked = np.load(self.folder / CHECKED_FILE, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if checked.dtype != np.uint64 or checked.ndim != 1:
            return None
        gone = [n for n in self._verified if n not in set(names)]
        stale = [self.hashes(n) for n in gone]
        if any(h is None for h in stale):
            return None
        checked = np.asarray(checked)
        if len(checked) > 1 and (checked[1:] == checked[:-1]).any():
            return None  # a hash collision among checked uids: removing by value would not be exact
        if stale:
            drop = np.concatenate(stale)
            pos = np.searchsorted(checked, drop)
            found = pos < len(checked)
            found[found] = checked[pos[found]] == drop[found]
            checked = np.delete(checked, pos[found])
        return checked, gone

    def commit(self, names: list[str], checked: np.ndarray | None) -> None:
        """After a successful scan of exactly `names`: writes the staged entries and `checked` (the sorted hashes of
        all of them; None when unchanged since the last scan), records `names` as checked together and deletes the
        entries of files no longer listed."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, hashes in self._fresh.items():
            if name in names:
                _save(self.folder / f"{name}.npy", hashes)
        if checked is not None:
            _save(self.folder / CHECKED_FILE, checked)
            self._checked_stamp = file_stamp(str(self.folder / CHECKED_FILE))
        keep = set(names)
        index = {"v": CACHE_VERSION, "entries": {n: self._entries[n] for n in names}, "verified": sorted(keep),
                 "checked_stamp": self._checked_stamp}
        atomic_write_text(self.folder / INDEX_FILE, json.dumps(index, sort_keys=True))
        for path in self.folder.glob("*.npy"):
            if path.name != CHECKED_FILE and path.stem not in keep:
                path.unlink(missing_ok=True)
        self._fresh.clear()
        self._entries, self._verified = index["entries"], sorted(keep)
