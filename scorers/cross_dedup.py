"""SemDeDup of new rows against rows already decided (incremental curation).

Method: SemDeDup (Abbas et al. 2023, facebookresearch/SemDeDup) inside one concept cluster, with every earlier row
ranked before every new row. New row j is a duplicate when its cosine similarity to any earlier row of the cluster
(removed or not, the reference rule), or to any new row ranked before it, exceeds 1 − ε. Similarities are computed in
float32 block by block with a running max, so no n × m matrix is held for a large cluster.

Orientation: `max_sim` higher = more redundant; `dup_of` names the most similar earlier row (old rows as their index in
the `old` blocks' concatenation, new rows as −2 − their position in `new`), −1 where there is no earlier row.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def cross_semdedup(
    new: np.ndarray, old_blocks: Iterable[np.ndarray], *, eps: float, block: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """new: m × d unit rows already in rank order (most worth keeping first); old_blocks: the cluster's earlier rows.

    Returns (is_dup m bool, dup_of m int64, max_sim m float32; −inf where the row has no earlier row).
    """
    x = np.asarray(new, dtype=np.float32)
    m = len(x)
    best = np.full(m, -np.inf, dtype=np.float32)
    arg = np.full(m, -1, dtype=np.int64)
    offset = 0
    for chunk in old_blocks:
        c = np.asarray(chunk, dtype=np.float32)
        if len(c) and m:
            s = x @ c.T
            top = s.argmax(axis=1)
            val = s[np.arange(m), top]
            better = val > best
            best[better], arg[better] = val[better], top[better] + offset
        offset += len(c)
    for start in range(0, m, block):  # new against the new rows ranked before them (upper triangle, by columns)
        cols = x[start:start + block]
        s = x[:start + len(cols)] @ cols.T  # rows 0..stop vs columns start..stop
        rows_idx = np.arange(start + len(cols))[:, None]
        s[rows_idx >= (np.arange(len(cols)) + start)[None, :]] = -np.inf  # only rows ranked before the column
        if len(s):
            top = s.argmax(axis=0)
            val = s[top, np.arange(len(cols))]
            sel = slice(start, start + len(cols))
            better = val > best[sel]
            best[sel] = np.where(better, val, best[sel])
            arg[sel] = np.where(better, -2 - top, arg[sel])
    is_dup = best > 1.0 - eps
    return is_dup, np.where(is_dup, arg, -1), best
