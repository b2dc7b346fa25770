"""SemDeDup of new rows against rows already decided (incremental curation).

Method: SemDeDup (Abbas et al. 2023, facebookresearch/SemDeDup) inside each concept cluster, with every earlier row
of the cluster ranked before every new row. New row j is a duplicate when its cosine similarity to any earlier row of
its cluster (removed or not, the reference rule), or to any new row of its cluster ranked before it, exceeds 1 − ε.

The earlier rows arrive as a stream of blocks in any cluster mix (in practice the store read in row order, so reads
are sequential however the clusters interleave); each block is compared only with the new rows of the clusters it
holds, in float32, with a running max, so neither an n × m matrix nor a whole cluster is ever held.

Orientation: `max_sim` higher = more redundant; `dup_of` names the most similar earlier row (old rows as their index
in the concatenation of the old blocks, the first one on ties; new rows as −2 − their position in `new`), −1 where
the row is not a duplicate.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def cross_semdedup(
    new: np.ndarray, new_clusters: np.ndarray, old_blocks: Iterable[tuple[np.ndarray, np.ndarray]], *, eps: float,
    block: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """new: m × d unit rows, in rank order within each cluster (most worth keeping first); new_clusters: their
    cluster ids; old_blocks: (rows × d unit embeddings, their cluster ids) of the earlier rows.

    Returns (is_dup m bool, dup_of m int64, max_sim m float32; −inf where the row has no earlier row).
    """
    x = np.asarray(new, dtype=np.float32)
    new_clusters = np.asarray(new_clusters)
    m = len(x)
    best = np.full(m, -np.inf, dtype=np.float32)
    arg = np.full(m, -1, dtype=np.int64)
    members = _groups(new_clusters)
    gathered = {c: x[rows] for c, rows in members.items()}
    offset = 0
    for chunk, chunk_clusters in old_blocks:
        c32 = np.asarray(chunk, dtype=np.float32)
        for c, cols in _groups(np.asarray(chunk_clusters)).items():
            rows = members.get(c)
            if rows is None:
                continue
            s = gathered[c] @ c32[cols].T
            top = s.argmax(axis=1)
            val = s[np.arange(len(rows)), top]
            better = val > best[rows]  # strict: an earlier block keeps a tie
            best[rows[better]] = val[better]
            arg[rows[better]] = offset + cols[top[better]]
        offset += len(c32)
    for c, rows in members.items():  # new rows against the new rows of the cluster ranked before them
        xc = gathered[c]
        for start in range(0, len(rows), block):
            cols = xc[start:start + block]
            s = xc[:start + len(cols)] @ cols.T  # rows 0..stop vs columns start..stop
            s[np.arange(start + len(cols))[:, None] >= (np.arange(len(cols)) + start)[None, :]] = -np.inf
            top = s.argmax(axis=0)
            val = s[top, np.arange(len(cols))]
            sel = rows[start:start + len(cols)]
            better = val > best[sel]
            best[sel[better]] = val[better]
            arg[sel[better]] = -2 - rows[top[better]]
    is_dup = best > 1.0 - eps
    return is_dup, np.where(is_dup, arg, -1), best


def _groups(clusters: np.ndarray) -> dict[int, np.ndarray]:
    """Positions per cluster id, each in increasing order."""
    order = np.argsort(clusters, kind="stable")
    ids, starts = np.unique(clusters[order], return_index=True)
    stops = np.append(starts[1:], len(order))
    return {int(c): order[a:b] for c, a, b in zip(ids.tolist(), starts.tolist(), stops.tolist())}


# ---- within the threshold only: exact decisions without comparing every old row ------------------------------------
PROJECTION_DIMS = 16
PROJECTION_NAME = f"dct{PROJECTION_DIMS}"  # recorded with persisted projections: another name means recompute them
# Added to the candidate bound: covers float32 rounding in the projections, the bound's product and the products the
# decisions are made with (each below 1e-4), so no row within the threshold is ever left out.
_SLACK = 1e-3
_BLOCK = 4096  # old rows per bound product


def projection(dim: int, dims: int = PROJECTION_DIMS) -> np.ndarray:
    """`dims` orthonormal rows of the d-dimensional DCT-II basis (spread over its frequencies), float64: a fixed,
    formula-defined projection (no random stream whose numbers could change between numpy versions)."""
    dims = min(dims, dim)
    k = 1 + (np.arange(dims) * (dim - 1)) // dims
    j = np.arange(dim)
    return np.sqrt(2.0 / dim) * np.cos(np.pi * k[:, None] * (2 * j[None, :] + 1) / (2 * dim))


def project(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Rows × (L + 1) float32: each row's projection P x and, last, its squared norm outside the projected space
    ‖x‖² − ‖P x‖² (≥ 0), computed in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    px = x64 @ p.T
    rest = np.maximum(np.einsum("ij,ij->i", x64, x64) - np.einsum("ij,ij->i", px, px), 0.0)
    return np.hstack([px, rest[:, None]]).astype(np.float32)


def candidate_pairs(new_proj: np.ndarray, new_clusters: np.ndarray, old_proj: np.ndarray, old_clusters: np.ndarray, *,
                    eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (new, old) pair of one cluster whose cosine similarity may exceed 1 − ε, and more: a superset, exact.

    With P orthonormal rows and Q the rest of the space, x·y = Px·Py + Qx·Qy ≤ Px·Py + (‖Qx‖² + ‖Qy‖²)/2, so a pair
    with x·y > 1 − ε has 2 Px·Py + ‖Qx‖² + ‖Qy‖² > 2 − 2ε: one product of (L + 2)-wide rows per pair instead of d-wide
    ones. `*_proj` are project()'s rows. Returns (new positions, old positions), sorted by new then old.
    """
    dims = new_proj.shape[1] - 1
    limit = np.float32(2.0 - 2.0 * eps - _SLACK)
    new_aug = np.hstack([2.0 * new_proj[:, :dims], new_proj[:, dims:], np.ones((len(new_proj), 1), np.float32)])
    old_clusters = np.asarray(old_clusters)
    small = old_clusters.astype(np.int16) if len(old_clusters) and 0 <= old_clusters.min() and old_clusters.max() < 2**15 else old_clusters
    order = np.argsort(small, kind="stable")  # each cluster's old rows contiguous, in order (radix sort on int16)
    old_aug = np.empty((dims + 2, len(order)), dtype=np.float32)  # columns = old rows: each block a contiguous slice
    sorted_proj = old_proj[order]
    old_aug[:dims] = sorted_proj[:, :dims].T
    old_aug[dims] = 1.0
    old_aug[dims + 1] = sorted_proj[:, dims]
    del sorted_proj
    ids, starts = np.unique(old_clusters[order], return_index=True)
    stops = np.append(starts[1:], len(order))
    span = {int(c): (int(a), int(b)) for c, a, b in zip(ids, starts, stops)}
    out_new, out_old = [], []
    for c, rows in _groups(np.asarray(new_clusters)).items():
        if c not in span:
            continue
        a = new_aug[rows]
        lo, hi = span[c]
        for start in range(lo, hi, _BLOCK):  # a block of bounds stays in cache for the row max that follows
            stop = min(hi, start + _BLOCK)
            bound = a @ old_aug[:, start:stop]
            hit = np.flatnonzero(bound.max(axis=1) > limit)  # one pass; the few rows with a candidate are scanned again
            if len(hit):
                i, j = np.nonzero(bound[hit] > limit)
                out_new.append(rows[hit[i]])
                out_old.append(order[start + j])
    if not out_new:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    new_pos, old_pos = np.concatenate(out_new), np.concatenate(out_old)
    order = np.lexsort((old_pos, new_pos))
    return new_pos[order].astype(np.int64), old_pos[order].astype(np.int64)


def cross_semdedup_within(new: np.ndarray, new_clusters: np.ndarray, new_pos: np.ndarray, old_pos: np.ndarray,
                          old_emb: np.ndarray, *, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cross_semdedup's decisions, with the old rows searched only within the threshold.

    new, new_clusters: as cross_semdedup. (new_pos, old_pos): candidate_pairs' pairs; old_emb: the embeddings of the
    old rows they name, one row per pair (read by the caller, which holds the store). A new row is a duplicate of an
    old row when their similarity (float32 product) exceeds 1 − ε, of the earlier new rows of its cluster as in
    cross_semdedup; the most similar wins, an old row on ties, the first old row (lowest position) among old ties.
    Decisions and dup_of are cross_semdedup's. max_sim counts old rows only within the threshold: for a new row
    that is no duplicate of an old row it is its largest similarity to an earlier new row of its cluster (−inf for
    none), not to every old row, which is what keeps the cost independent of the old rows' number.
    """
    x = np.asarray(new, dtype=np.float32)
    _, arg, best = cross_semdedup(x, new_clusters, [], eps=eps)  # the new rows among themselves (no old block)
    if len(new_pos):
        y = np.asarray(old_emb, dtype=np.float32)
        sim = np.einsum("ij,ij->i", x[new_pos], y).astype(np.float32)
        within = sim > 1.0 - eps
        new_pos, old_pos, sim = new_pos[within], old_pos[within], sim[within]
        # per new row: the highest similarity, the lowest old position among ties (pairs are sorted by new, old)
        order = np.lexsort((old_pos, -sim, new_pos))
        new_pos, old_pos, sim = new_pos[order], old_pos[order], sim[order]
        first = np.r_[True, new_pos[1:] != new_pos[:-1]] if len(new_pos) else np.empty(0, bool)
        rows, top, val = new_pos[first], old_pos[first], sim[first]
        old_wins = val >= best[rows]  # cross_semdedup compares the old rows first and keeps them on ties
        best[rows[old_wins]] = val[old_wins]
        arg[rows[old_wins]] = top[old_wins]
    is_dup = best > 1.0 - eps
    return is_dup, np.where(is_dup, arg, -1), best
