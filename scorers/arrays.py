"""Checks and small transforms the scorers share: embedding arrays, unit rows, label codes, uid ranks and rank keys."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_emb", "check_keep", "encode_labels", "mean_one_over", "rank_key", "uid_ranks", "unit_rows"]


def check_emb(emb: Any, name: str = "emb", *, non_empty: bool = False) -> None:
    """Refuses anything that is not a 2-D floating array of rows: a numpy array, a memmap, or a lazy row view
    (pipeline.rows.StoreRows), anything 2-D that slices into arrays."""
    if getattr(emb, "ndim", None) != 2 or not hasattr(emb, "__getitem__") or not hasattr(emb, "dtype"):
        raise ValueError(f"{name} must be a 2-D array (rows = samples), got {type(emb).__name__} "
                         f"with shape {getattr(emb, 'shape', None)}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{name} must be floating point (float16 / float32), got dtype {emb.dtype}")
    if non_empty and emb.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n, d], got shape {emb.shape}")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy with unit-norm rows (zero rows stay zero)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def encode_labels(labels: Any, n: int | None = None, *, name: str = "labels",
                  classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any sortable type (ints, strings) as int64 codes and the sorted classes, ``classes[codes] == labels``.

    n: the length the labels must have (None: any 1-D). With `classes`, codes index those classes and a label outside
    them gets -1.
    """
    y = np.asarray(labels)
    if n is None and y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if n is not None and y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contain NaN or inf")
    if classes is None:
        try:
            classes, codes = np.unique(y, return_inverse=True)
        except TypeError as exc:  # e.g. a mix of None, ints and strings
            raise ValueError(f"{name} must be all ints or all strings (sortable): {exc}") from exc
        return codes.reshape(-1).astype(np.int64), classes
    pos = np.clip(np.searchsorted(classes, y), 0, classes.shape[0] - 1)
    return np.where(classes[pos] == y, pos, -1).astype(np.int64), classes


def check_keep(keep: str) -> None:
    if keep not in ("hard", "easy", "random"):
        raise ValueError(f"keep must be 'hard', 'easy' or 'random', got {keep!r}")


def uid_ranks(uids: np.ndarray | Sequence[str], n: int) -> np.ndarray:
    """Rank of every uid in string order (int64); duplicate uids are an error that names them."""
    u = np.asarray(uids)
    if u.shape != (n,):
        raise ValueError(f"uids must have shape ({n},), got {u.shape}")
    if u.dtype == object:
        u = u.astype(str)  # fixed-width unicode sorts far faster than Python objects
    order = np.argsort(u, kind="stable")
    su = u[order]
    same = su[1:] == su[:-1]
    if same.any():
        dups = np.unique(su[1:][same])
        raise ValueError(f"uids must be unique; {len(dups)} repeated, e.g. {dups[:5].tolist()}")
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n, dtype=np.int64)
    return ranks


def rank_key(dist: np.ndarray, uid_rank: np.ndarray, keep: str, seed: int) -> np.ndarray:
    """Sort key (ascending = ranked first) of a cluster's rows before the uid tie-break: keep hard = farthest from the
    centroid first, easy = nearest first, random = a seeded permutation of uid order (independent of row order, so
    shards read in any order rank alike)."""
    if keep == "hard":
        return -np.asarray(dist, dtype=np.float64)
    if keep == "easy":
        return np.asarray(dist, dtype=np.float64)
    perm = np.random.default_rng(seed).permutation(len(uid_rank))
    return perm[uid_rank]


def mean_one_over(weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Weights scaled to mean 1 over the kept rows, 0 elsewhere (float32, the manifest's `weight`)."""
    out = np.where(keep, weights, 0.0)
    total = out.sum()
    if keep.any():
        if not np.isfinite(total) or total <= 0:
            raise ValueError("the kept rows' weights sum to zero or are not finite")
        out = out * (keep.sum() / total)
    return out.astype(np.float32)
