"""Outliers in embedding space: distance to the k-th nearest neighbour and a local density ratio.

Method: for each row, the cosine distances (1 − x·y on unit rows) to its k nearest other rows, found with FAISS
(exact flat inner-product search, or any inner-product index the caller already built over the same rows).
- ``kth_distance``: distance to the k-th neighbour (Ramaswamy, Rastogi & Shim, SIGMOD 2000, "Efficient algorithms for
  mining outliers from large data sets"; the kNN-distance outlier score fastdup and FiftyOne Brain also report).
- ``density_ratio``: the row's mean neighbour distance divided by the mean of its neighbours' own mean neighbour
  distances: a one-hop local density ratio in the spirit of LOF (Breunig et al., SIGMOD 2000, "LOF: identifying
  density-based local outliers"), simplified (no reachability distance). About 1 inside a uniform region, > 1 for a
  row sitting in a sparser spot than its neighbours, so a point near a tight cluster but outside it stands out even when
  the dataset's density varies from region to region.

With a ``reference`` set (rows the user names as in-domain: the step's `target`, e.g. a test split), the neighbours
are searched among the reference rows instead of the scored rows themselves: ``kth_distance`` is then the distance to
the k-th nearest *reference* row, the deep-nearest-neighbour out-of-distribution score of Sun, Ming, Zhu & Li (ICML
2022, "Out-of-distribution detection with deep nearest neighbors"), and ``density_ratio`` divides a row's mean
distance to its k reference neighbours by their own mean kNN distance inside the reference (LOF's novelty mode).
Without a reference, a group of more than k similar off-domain rows (e.g. 80 Fashion-MNIST images among CIFAR-10) is
each other's neighbourhood and scores as dense as the rest; against an in-domain reference it is far from everything.

Orientation: **higher = more outlying** (less worth keeping) for both scores, with or without a reference; a step keeps
the lowest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from scorers.step import (Between, Count, Fraction, Score, ScoringContext, SourceMapping, StepOutput, alive_rows, drop_by_score,
                          scatter, step, target_key)

__all__ = ["OutlierResult", "knn_search", "outlier_scores"]

_QUERY_ROWS = 16_384  # queries cast to float32 and searched at a time


@dataclass(frozen=True)
class OutlierResult:
    """Row-aligned with the input. ``neighbors``: n × k row indices (-1 where fewer than k other rows exist)."""

    kth_distance: np.ndarray  # float32 [n], cosine distance to the k-th nearest other row
    density_ratio: np.ndarray  # float32 [n], mean kNN distance / mean of the neighbours' mean kNN distances
    neighbors: np.ndarray  # int64 [n, k]
    distances: np.ndarray  # float32 [n, k], ascending
    # With a reference: the reference rows' own scores among the other reference rows (leave-one-out), the in-domain
    # distribution a novelty threshold is read from; None without a reference.
    reference_kth_distance: np.ndarray | None = None
    reference_density_ratio: np.ndarray | None = None


def knn_search(emb: Any, *, k: int, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest *other* rows of every row: (cosine distances n × k ascending, row ids n × k; -1 where missing).

    ``index``: a FAISS inner-product index holding exactly these rows in this order (e.g. the run's kNN index);
    None builds an exact flat one. A row's own id is removed from its results; when an exact copy pushes the row
    itself out of the top k+1, the last hit is dropped instead, so every row gets k neighbours.
    """
    import faiss

    n, d = emb.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index is None:
        index = faiss.IndexFlatIP(d)
        for start in range(0, n, _QUERY_ROWS):
            index.add(np.ascontiguousarray(emb[start:start + _QUERY_ROWS], dtype=np.float32))
    elif index.ntotal != n:
        raise ValueError(f"index holds {index.ntotal} rows, emb has {n}")
    kk = min(k + 1, n)
    dist = np.full((n, k), np.nan, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, _QUERY_ROWS):
        q = np.ascontiguousarray(emb[start:start + _QUERY_ROWS], dtype=np.float32)
        sim, hit = index.search(q, kk)
        own = hit == np.arange(start, start + len(q))[:, None]
        # Drop the row's own hit; rows whose own hit is absent (ties with copies) drop their last hit.
        keep = ~own
        no_self = ~own.any(axis=1)
        keep[no_self, kk - 1] = False
        sim_k = sim[keep].reshape(len(q), kk - 1)
        hit_k = hit[keep].reshape(len(q), kk - 1)
        m = min(k, kk - 1)
        dist[start:start + len(q), :m] = 1.0 - sim_k[:, :m]
        ids[start:start + len(q), :m] = hit_k[:, :m]
    ids[ids < 0] = -1
    return np.clip(dist, 0.0, 2.0), ids


def outlier_scores(emb: Any, *, k: int = 10, index: Any = None, reference: Any = None,
                   reference_index: Any = None) -> OutlierResult:
    """kNN-distance and local-density-ratio outlier scores of every row (see the module docstring).

    Args:
        emb: n × d unit rows (float16/32 or a memory-mapped store view).
        k: neighbours (default 10, as in fastdup/cleanvision-style kNN outlier scores). Needs n > k (m > k with a
            reference).
        index: optional FAISS inner-product index over the same rows (reuses the run's index); not used with a reference.
        reference: optional m × d unit rows of an in-domain set: neighbours are then searched among them (the module
            docstring), and ``neighbors`` index the reference rows.
        reference_index: optional FAISS inner-product index over exactly the reference rows.

    Returns:
        :class:`OutlierResult`. Orientation: higher = more outlying.
    """
    if reference is None:
        if emb.shape[0] <= k:
            raise ValueError(f"outlier needs more than k={k} rows, got {emb.shape[0]}")
        dist, ids = knn_search(emb, k=k, index=index)
        own_dist, own_ids = dist, ids
    else:
        if reference.shape[1] != emb.shape[1]:
            raise ValueError(f"reference rows have dim {reference.shape[1]}, scored rows {emb.shape[1]}")
        if reference.shape[0] <= k:
            raise ValueError(f"outlier against a reference needs more than k={k} reference rows, got {reference.shape[0]}")
        own_dist, own_ids = knn_search(reference, k=k, index=reference_index)
        dist, ids = _search_in(reference, emb, k=k, index=reference_index)
    dist = np.where(ids < 0, np.nan, dist)  # an approximate index can return fewer than k hits; score with what it found
    kth = dist[:, -1].copy()
    missing = ~np.isfinite(kth)
    if missing.any():
        kth[missing] = np.nanmax(dist[missing], axis=1)
    mean_d = np.nanmean(dist, axis=1)
    # the neighbours' own mean kNN distance, inside the set they belong to (the scored rows, or the reference)
    own_mean = np.nanmean(np.where(own_ids < 0, np.nan, own_dist), axis=1)
    ratio = _density_ratio(mean_d, ids, own_mean)
    ref_kth = ref_ratio = None
    if reference is not None:
        ref_kth = np.where(own_ids[:, -1] >= 0, own_dist[:, -1], np.nan).astype(np.float32)
        ref_ratio = _density_ratio(own_mean, own_ids, own_mean).astype(np.float32)
    return OutlierResult(kth_distance=kth.astype(np.float32), density_ratio=ratio.astype(np.float32), neighbors=ids,
                         distances=dist, reference_kth_distance=ref_kth, reference_density_ratio=ref_ratio)


def _density_ratio(mean_d: np.ndarray, ids: np.ndarray, own_mean: np.ndarray) -> np.ndarray:
    """A row's mean kNN distance over its neighbours' own mean kNN distances (``ids`` index ``own_mean``; -1 = none)."""
    neighbour_mean = np.where(ids >= 0, own_mean[np.maximum(ids, 0)], np.nan)
    denom = np.nanmean(neighbour_mean, axis=1)
    # An exact-duplicate cluster has zero distances: a ratio of 0/0 means "as dense as its neighbours".
    return np.where(denom > 1e-12, mean_d / np.maximum(denom, 1e-12), np.where(mean_d > 1e-12, np.inf, 1.0))


def _search_in(reference: Any, queries: Any, *, k: int, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of every query row: (cosine distances ascending, reference row ids; -1 where missing)."""
    import faiss

    if index is None:
        index = faiss.IndexFlatIP(reference.shape[1])
        for start in range(0, reference.shape[0], _QUERY_ROWS):
            index.add(np.ascontiguousarray(reference[start:start + _QUERY_ROWS], dtype=np.float32))
    elif index.ntotal != reference.shape[0]:
        raise ValueError(f"reference_index holds {index.ntotal} rows, reference has {reference.shape[0]}")
    n = queries.shape[0]
    dist = np.full((n, k), np.nan, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, _QUERY_ROWS):
        q = np.ascontiguousarray(queries[start:start + _QUERY_ROWS], dtype=np.float32)
        sim, hit = index.search(q, k)
        dist[start:start + len(q)] = 1.0 - sim
        ids[start:start + len(q)] = hit
    ids[ids < 0] = -1
    return np.clip(dist, 0.0, 2.0), ids

# ---- the curate step --------------------------------------------------------------------------------------------------

@step("outlier", reason="outlier", needs=("targets",), exactly_one=(("keep_fraction", "quantile", "max_score", "target_quantile"),),
      scores=(Score("score_outlier", higher="more outlying"), Score("score_outlier_density", higher="more outlying")),
      orientation="score_outlier: k-th NN cosine distance (to the target's rows when a target is given), "
                  "score_outlier_density: local density ratio; higher = more outlying")
def step_outlier(
    ctx: ScoringContext,
    *,
    k: Count = 10,
    score: Literal["kth_distance", "density_ratio"] = "kth_distance",
    target: SourceMapping | None = None,
    keep_fraction: Fraction | None = None,
    quantile: Between(0, 1) | None = None,
    max_score: float | None = None,
    target_quantile: Between(0, 1) | None = None,
) -> StepOutput:
    """Outliers by the distance to the k-th nearest neighbour and a local density ratio (outlier_scores above), among the
    rows still alive. `score` (kth_distance or density_ratio) decides; exactly one of keep_fraction (of all rows),
    quantile (drop the top q) or max_score. score_outlier = k-th NN cosine distance, score_outlier_density = the ratio;
    higher = more outlying. The kNN index is the run's (ctx.knn_index: exact below 200k rows, IVF above).
    `target`: a source of in-domain rows (e.g. the test split, embedded with the run's embedder): neighbours are then
    searched among its rows, so a group of similar off-domain rows, each other's neighbours in the pool, is far from
    everything in the target and is found too (Sun et al. 2022, deep nearest neighbours).
    `target_quantile` (needs a target): the threshold is that quantile of the target rows' own scores, each target row
    scored against the other target rows, so about (1 − q) of in-domain rows would be dropped whatever the pool holds
    (Sun et al. set it so 95% of in-domain data passes: 0.95). No guess of how much of the pool is off-domain needed.
    """
    if target_quantile is not None and target is None:
        raise ValueError("target_quantile needs a target: the in-domain rows whose own scores set the threshold")
    rows, emb = alive_rows(ctx)
    reference = None
    if target is not None:
        reference = ctx.targets.get(target_key(target))
        if reference is None:
            raise ValueError(f"target {target} was not embedded before scoring")
    search_in = emb if reference is None else reference
    index, index_info = ctx.knn_index(search_in, ctx.seed) if ctx.knn_index is not None else (None, {"kind": "exact (scorer)"})
    if reference is None:
        result = outlier_scores(emb, k=k, index=index)
    else:
        result = outlier_scores(emb, k=k, reference=reference, reference_index=index)
    n = len(ctx.alive)
    kth, ratio = scatter(n, rows, result.kth_distance), scatter(n, rows, result.density_ratio)
    chosen = kth if score == "kth_distance" else ratio
    if target_quantile is not None:
        in_domain = result.reference_kth_distance if score == "kth_distance" else result.reference_density_ratio
        max_score = float(np.nanquantile(in_domain, target_quantile))
    drop, note = drop_by_score(ctx, chosen, keep="low", keep_fraction=keep_fraction, threshold=max_score, quantile=quantile)
    if target_quantile is not None:
        note["target_quantile"] = target_quantile
    neighbours = {"neighbours_in": "target", "target_rows": int(len(reference))} if reference is not None else {"neighbours_in": "pool"}
    return StepOutput(scores={"score_outlier": kth, "score_outlier_density": ratio}, drop=drop,
                      info={"k": k, "score": score, "index": index_info, **neighbours, **note})
