"""Exact duplicates by content hash."""
from __future__ import annotations

import numpy as np


def exact_duplicates(hashes: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """For each row, the row index of the copy it duplicates, or -1.

    Method: rows with equal byte hashes (sha1) are copies; in each group the row with the smallest uid is
    the original (uid order, not row order, so the answer does not depend on how the source was sharded).
    Rows with a null hash are never duplicates. Orientation: not a score; -1 means keep.
    """
    hashes = np.asarray(hashes, dtype=object)
    uids = np.asarray(uids, dtype=object)
    if hashes.shape != uids.shape:
        raise ValueError(f"hashes {hashes.shape} and uids {uids.shape} must align")
    dup_of = np.full(len(hashes), -1, dtype=np.int64)
    original: dict[str, int] = {}
    for row in sorted(range(len(hashes)), key=lambda i: uids[i]):
        h = hashes[row]
        if h is None:
            continue
        first = original.setdefault(h, row)
        if first != row:
            dup_of[row] = first
    return dup_of
