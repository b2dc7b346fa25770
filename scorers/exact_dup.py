"""Exact duplicates by content hash."""
from __future__ import annotations

import numpy as np

from scorers.step import ScoringContext, StepOutput, step


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


@step("exact_dup", reason="exact_dup", needs=("sha1",), orientation="drops byte-identical copies; keeps the smallest uid")
def step_exact_dup(ctx: ScoringContext) -> StepOutput:
    dup_of = exact_duplicates(ctx.sha1, ctx.uids)
    drop = (dup_of >= 0) & ctx.alive
    return StepOutput(drop=drop, dup_of=np.where(drop, dup_of, -1), info={"duplicates": int(drop.sum())})
