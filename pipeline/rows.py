"""The ok embeddings of a finished store as one lazy n × d array, for stores larger than RAM.

`StoreRows` looks like a read-only numpy array to the scorers (shape, dtype, len, slicing, fancy indexing,
np.asarray) but holds only the shard paths and, for a subset view, the row indices. Rows are read on demand
with positioned reads (os.pread), not through a memory map, so what a process has read does not stay
mapped into it: peak memory is what the caller gathers, whatever the store's size. It pickles as paths and
indices, so a Dask or Ray worker reads its own rows instead of receiving them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Consecutive rows are read in one call up to this many bytes.
_MAX_READ_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardFile:
    path: str
    rows: int
    data_offset: int  # bytes before the first row (the .npy header)


def shard_file(path: str | Path) -> ShardFile:
    """Reads a 2-d C-order .npy header: where its rows start and how many there are. The file must be exactly
    header + data long: numpy itself accepts trailing bytes, so a damaged header-length field that still parses
    (the header's space padding) would otherwise shift every value silently."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-d C-order array, got shape {shape}")
        data_offset = fh.tell()
        expected = data_offset + int(np.prod(shape)) * dtype.itemsize
        actual = os.fstat(fh.fileno()).st_size
        if actual != expected:
            raise ValueError(f"{path} is {actual} bytes but its header describes {expected}")
        return ShardFile(path=str(path), rows=int(shape[0]), data_offset=data_offset)


class StoreRows:
    """A lazy concatenation of 2-d .npy shards (all of one dtype and width), optionally restricted to some rows."""

    def __init__(self, shards: list[ShardFile], dim: int, dtype: np.dtype | str, rows: np.ndarray | None = None):
        self.shards = list(shards)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate(([0], np.cumsum([s.rows for s in self.shards]))).astype(np.int64)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._fds: dict[int, int] = {}

    @classmethod
    def open(cls, paths: list[str | Path], *, dim: int, dtype: np.dtype | str) -> StoreRows:
        return cls([shard_file(p) for p in paths], dim, dtype)

    # -- array protocol ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.rows is None else len(self.rows)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # rows then columns: read the rows, let numpy do the rest
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([key]))[0]
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"boolean index of shape {key.shape} for {len(self)} rows")
            key = np.flatnonzero(key)
        return self.take(key)

    def subset(self, rows: np.ndarray) -> StoreRows:
        """A lazy view of some rows (indices into this view), in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        base = rows if self.rows is None else self.rows[rows]
        return StoreRows(self.shards, self.dim, self.dtype, base)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at the given positions, as a new array in the store's dtype."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        global_idx = idx if self.rows is None else self.rows[idx]
        out = np.empty((len(idx), self.dim), dtype=self.dtype)
        if not len(idx):
            return out
        order = np.argsort(global_idx, kind="stable")
        sorted_idx = global_idx[order]
        row_bytes = self.dim * self.dtype.itemsize
        flat = out.reshape(-1).view(np.uint8).reshape(len(idx), row_bytes)
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        # runs of consecutive rows inside one shard are read in one call
        breaks = np.flatnonzero((np.diff(sorted_idx) != 1) | (np.diff(shard_of) != 0)) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [len(sorted_idx)]))
        for a, b in zip(starts.tolist(), stops.tolist()):
            shard = int(shard_of[a])
            local = int(sorted_idx[a] - self.offsets[shard])
            fd = self._fd(shard)
            base = self.shards[shard].data_offset + local * row_bytes
            max_rows = max(1, _MAX_READ_BYTES // row_bytes)
            for s in range(a, b, max_rows):
                e = min(b, s + max_rows)
                buf = os.pread(fd, (e - s) * row_bytes, base + (s - a) * row_bytes)
                if len(buf) != (e - s) * row_bytes:
                    raise ValueError(f"{self.shards[shard].path} is shorter than its header says")
                block = np.frombuffer(buf, dtype=np.uint8).reshape(e - s, row_bytes)
                flat[order[s:e]] = block
        return out

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # file descriptors do not travel: a worker opens its own
    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "dim": self.dim, "dtype": self.dtype.str, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards"], state["dim"], state["dtype"], state["rows"])
