"""Train/eval leakage (decontamination): training rows that are copies or near-copies of evaluation rows.

Method: exact byte-hash matches first (sha1 of the file bytes), then a FAISS range search of the training rows against
the evaluation rows' embeddings: a training row leaks when its cosine similarity to some evaluation row is at least
1 − eps. The match reported is the exact copy if any, else the most similar evaluation row. This is the check the
decontamination sections of large-data papers run (e.g. Radford et al. 2021, CLIP, appendix C: duplicate detector
against the eval sets; Gadre et al. 2023, DataComp: removal of near-duplicates of evaluation images), and what
FiftyOne Brain's and fastdup's leakage reports compute.

Orientation: not a keep score. ``similarity`` is the best cosine similarity to any evaluation row (higher = closer to
the eval set = more likely leaked); ``match`` is the evaluation row index, -1 for no leak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scorers.step import NonNegative, Score, ScoringContext, SourceMapping, StepOutput, alive_rows, scatter, step, target_key

__all__ = ["LeakResult", "find_leaks"]

_QUERY_ROWS = 16_384


@dataclass(frozen=True)
class LeakResult:
    match: np.ndarray  # int64 [n_train]: evaluation row this row leaks from, -1 if none
    similarity: np.ndarray  # float32 [n_train]: best cosine similarity to an evaluation row (NaN when not searched)
    exact: np.ndarray  # bool [n_train]: matched by byte hash


def find_leaks(
    train_emb: Any,
    eval_emb: Any,
    *,
    eps: float = 0.02,
    train_hashes: np.ndarray | None = None,
    eval_hashes: np.ndarray | None = None,
    index: Any = None,
) -> LeakResult:
    """Every training row within ``eps`` (cosine distance) of an evaluation row, exact hash matches first.

    Args:
        train_emb: n × d unit rows (float16/32, memory-mapped is fine: searched in blocks).
        eval_emb: m × d unit rows of the evaluation sources (all of them stacked; the caller maps rows to sources).
        eps: cosine-distance radius; a row leaks when max_j x·e_j ≥ 1 − eps. 0.02 catches re-encoded and slightly
            resized copies of the same photo while leaving distinct photos of one class apart (measured in the tests).
        train_hashes, eval_hashes: byte hashes (None entries never match); both or neither.
        index: optional FAISS inner-product index over ``eval_emb`` (exact flat is built when None).

    Returns:
        :class:`LeakResult`. similarity is the best similarity found within the radius, or the exact-hash row's
        similarity, NaN for rows with no evaluation row within the radius.
    """
    import faiss

    if not 0 <= eps < 2:
        raise ValueError(f"eps must be in [0, 2), got {eps}")
    if (train_hashes is None) != (eval_hashes is None):
        raise ValueError("give both train_hashes and eval_hashes, or neither")
    n, d = train_emb.shape
    m = eval_emb.shape[0]
    if eval_emb.shape[1] != d:
        raise ValueError(f"eval embeddings have dim {eval_emb.shape[1]}, training rows {d}")
    match = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float32)
    exact = np.zeros(n, dtype=bool)
    if train_hashes is not None:
        first: dict[Any, int] = {}
        for j, h in enumerate(eval_hashes):
            if h is not None:
                first.setdefault(h, j)
        for i, h in enumerate(train_hashes):
            j = first.get(h) if h is not None else None
            if j is not None:
                match[i], exact[i] = j, True
    if m == 0 or n == 0:
        return LeakResult(match, similarity, exact)
    if index is None:
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(eval_emb, dtype=np.float32))
    elif index.ntotal != m:
        raise ValueError(f"index holds {index.ntotal} rows, eval_emb has {m}")
    # range_search on an inner-product index returns hits with similarity > radius; nudge by float32 epsilon so
    # "≥ 1 − eps" holds at the boundary.
    radius = float(np.nextafter(np.float32(1.0 - eps), np.float32(-np.inf)))
    for start in range(0, n, _QUERY_ROWS):
        q = np.ascontiguousarray(train_emb[start:start + _QUERY_ROWS], dtype=np.float32)
        lims, sims, ids = index.range_search(q, radius)
        counts = np.diff(lims)
        rows = np.flatnonzero(counts)
        for r in rows:
            seg = slice(lims[r], lims[r + 1])
            best = int(np.argmax(sims[seg]))
            i = start + r
            similarity[i] = sims[seg][best]
            if not exact[i]:
                match[i] = ids[seg][best]
    if exact.any():  # report the exact copy's similarity too (≈ 1, unless the embedder is not deterministic)
        rows = np.flatnonzero(exact)
        e = np.asarray(eval_emb[np.sort(match[rows])], dtype=np.float32)
        order = np.argsort(match[rows], kind="stable")
        t = np.asarray(train_emb[rows[order]], dtype=np.float32)
        similarity[rows[order]] = np.einsum("ij,ij->i", t, e)
    return LeakResult(match, similarity, exact)

# ---- the curate step --------------------------------------------------------------------------------------------------

@step("leak", reason="leak", scores=(Score("score_leak", higher="closer to an evaluation row"),),
      orientation="score_leak: best cosine similarity to an eval row within eps; dup_of = that eval row's uid")
def step_leak(ctx: ScoringContext, *, eval_sources: list[SourceMapping], eps: NonNegative = 0.02) -> StepOutput:
    """Decontamination: drops every row within eps (cosine distance) of a row of any eval source, exact byte-hash copies
    first, then a FAISS range search (find_leaks above); dup_of = the eval row's uid. score_leak = best similarity to an
    eval row within eps (NaN elsewhere). run.json: leaked rows per eval source.
    """
    sets = [ctx.eval_sets[target_key(spec)] for spec in eval_sources]
    eval_emb = np.concatenate([s.emb for s in sets]) if sets else np.zeros((0, ctx.emb.shape[1]), np.float32)
    eval_uids = np.concatenate([s.uids for s in sets]).astype(object)
    eval_sha1 = np.concatenate([s.sha1 for s in sets]).astype(object)
    owner = np.concatenate([np.full(len(s.uids), i) for i, s in enumerate(sets)])
    rows, emb = alive_rows(ctx)
    sha1 = np.asarray(ctx.meta_columns(["sha1"])["sha1"], dtype=object)[rows]
    result = find_leaks(emb, eval_emb, eps=eps, train_hashes=sha1, eval_hashes=eval_sha1)
    n = len(ctx.alive)
    leaked = result.match >= 0
    drop = np.zeros(n, dtype=bool)
    drop[rows[leaked]] = True
    dup = np.full(n, None, dtype=object)
    dup[rows[leaked]] = eval_uids[result.match[leaked]]
    per_source = {f"{i}:{sets[i].name}": int((owner[result.match[leaked]] == i).sum()) for i in range(len(sets))}
    return StepOutput(scores={"score_leak": scatter(n, rows, result.similarity)}, drop=drop, text={"dup_of": dup},
                      info={"eps": eps, "leaked_by_eval_source": per_source, "exact_hash_matches": int(result.exact.sum()),
                            "eval_rows": int(len(eval_emb))})
