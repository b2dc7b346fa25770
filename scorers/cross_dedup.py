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
