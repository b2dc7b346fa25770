"""Concept-cluster complexity pruning ("density-based pruning", DBP).

Method: "Effective pruning of web-scale datasets based on complexity of concept clusters" (Abbas, Rusak, Tirumala,
Brendel, Chaudhuri, Morcos; ICLR 2024), reference code amro-kamal/effective_pruning. On unit embeddings clustered
with spherical k-means:

- d_intra_j = mean over the members of cluster j of ``1 - x·mu_j`` (how spread the concept is);
- d_inter_j = mean over the l nearest OTHER centroids of ``1 - mu_j·mu_c`` (how isolated it is);
- complexity C_j = d_inter_j · d_intra_j;
- P = softmax(C / tau); cluster j keeps x_j = clip(N·P_j + lambda, lb_j, n_j) items, one scalar lambda making
  sum(x) = N (the paper solves the equivalent QP ``min ||x - N·P||² s.t. sum x = N, lb <= x <= n`` with OSQP and
  rounds with ``rint``, which can miss N; here lambda is found by bisection and the rounding is largest-remainder, so
  the kept count is exactly N);
- inside a cluster keep the x_j items farthest from the centroid (keep hard).

Paper settings: tau = 0.1, l = 20, class-balance ratio 0 (the repository's defaults, tau = 0.5 and ratio 0.5, differ).
In the paper DBP runs after SemDeDup (and a CLIP-score filter).
Orientation: :func:`dbp_select` returns a keep mask (True = keep); complexity is per cluster (higher = more of the
cluster kept).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from scorers.arrays import check_emb, check_keep, rank_key, uid_ranks
from scorers.prototypes import check_cluster_ids, distance_to_centroid, unit_centroids
from scorers.semdedup import Keep
from scorers.step import Between, Count, Fraction, NonNegativeInt, Positive, Score, ScoringContext, StepOutput, budget_for, scatter, step

__all__ = ["ClusterComplexity", "cluster_complexity", "dbp_quotas", "dbp_select"]

# Clusters with at most this many members get no complexity of their own (the reference's NaN case) but the mean.
_MIN_SIZE_FOR_COMPLEXITY = 3


@dataclass(frozen=True)
class ClusterComplexity:
    """Per-cluster quantities (index = cluster id), float64 unless stated.

    d_intra: mean ``1 - x·mu_j`` over members (NaN for an empty cluster).
    d_inter: mean ``1 - mu_j·mu_c`` over the ``n_neighbors`` nearest other centroids.
    complexity: ``d_inter * d_intra``; clusters of 1-2 items take the mean over the others (as the reference's NaN
        fill); empty clusters are NaN (they get quota 0 in :func:`dbp_quotas`).
    sizes: int64 member counts.
    """

    d_intra: np.ndarray
    d_inter: np.ndarray
    complexity: np.ndarray
    sizes: np.ndarray


def _shape(emb: np.ndarray | None, cluster_ids: np.ndarray, centroids: np.ndarray, given: np.ndarray | None) -> tuple[int, int]:
    """(n, d): from the embeddings, or, when only distances are given (emb=None), from the ids and centroids."""
    if emb is not None:
        check_emb(emb)
        return emb.shape
    if given is None:
        raise ValueError("emb may be None only when dist_to_centroid is given")
    return len(np.asarray(cluster_ids)), np.asarray(centroids).shape[1]


def cluster_complexity(
    emb: np.ndarray | None,
    cluster_ids: np.ndarray,
    centroids: np.ndarray,
    *,
    n_neighbors: int = 20,
    dist_to_centroid: np.ndarray | None = None,
) -> ClusterComplexity:
    """DBP cluster complexity (Abbas et al. ICLR 2024): C_j = d_inter_j · d_intra_j on unit embeddings and centroids.

    d_inter uses all given centroids (an empty cluster's centroid still counts as a neighbour, as in the reference,
    which indexes every centroid); with fewer than ``n_neighbors + 1`` centroids, all the others are used.
    The centroid's own entry is excluded by index, not by position in a search result (robust to repeated centroids).
    ``dist_to_centroid`` (n,) may pass distances already computed (e.g. ``1 - sim`` from the spherical k-means
    assignment) to skip a pass over the embeddings; ``emb`` may then be None.
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    n, d = _shape(emb, cluster_ids, centroids, dist_to_centroid)
    mu = unit_centroids(centroids, d)
    k = mu.shape[0]
    ids = check_cluster_ids(cluster_ids, n, k)
    sizes = np.bincount(ids, minlength=k).astype(np.int64)

    dist = _dist(emb, ids, centroids, dist_to_centroid)
    with np.errstate(invalid="ignore", divide="ignore"):
        d_intra = np.bincount(ids, weights=dist, minlength=k) / sizes  # NaN where empty

    d_inter = np.full(k, np.nan)
    if k > 1:
        l = min(n_neighbors, k - 1)
        rows_per_chunk = max(1, (1 << 24) // k)  # k x k in float64 would be 20 GB at k = 50,000
        for s in range(0, k, rows_per_chunk):
            sim = mu[s:s + rows_per_chunk] @ mu.T
            sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf  # never one's own neighbour
            top = np.partition(-sim, l - 1, axis=1)[:, :l]  # the l largest similarities (negated)
            d_inter[s:s + sim.shape[0]] = (1.0 + top).mean(axis=1)

    complexity = d_inter * d_intra
    small = sizes < _MIN_SIZE_FOR_COMPLEXITY
    complexity[small] = np.nan
    valid = ~np.isnan(complexity)
    fill = complexity[valid].mean() if valid.any() else 0.0
    complexity[small & (sizes > 0)] = fill
    return ClusterComplexity(d_intra=d_intra, d_inter=d_inter, complexity=complexity, sizes=sizes)


def _dist(emb: np.ndarray, ids: np.ndarray, centroids: np.ndarray, given: np.ndarray | None) -> np.ndarray:
    if given is None:
        return distance_to_centroid(emb, ids, centroids)
    dist = np.asarray(given)
    if dist.shape != ids.shape or not np.isfinite(dist).all():
        raise ValueError(f"dist_to_centroid must be finite with shape {ids.shape}, got {dist.shape}")
    return dist


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def dbp_quotas(
    complexity: np.ndarray,
    sizes: np.ndarray,
    *,
    keep_fraction: float | None = None,
    budget: int | None = None,
    temperature: float = 0.1,
    min_per_cluster: int = 1,
    class_balance_ratio: float = 0.0,
) -> np.ndarray:
    """Items to keep per cluster (DBP): quotas summing exactly to the budget N.

    N = ``budget``, or ``round(keep_fraction * sum(sizes))`` (half up; the reference truncates).
    P = softmax(complexity / temperature) over the non-empty clusters. Lower bounds ``lb_j = min(m, n_j - 1)`` as in
    the reference, so a 1-item cluster may be dropped (lb 0) and an empty one gets 0; ``m = min_per_cluster``, or,
    when ``class_balance_ratio`` > 0 (the paper's class-balance knob, reference ``cls_bal_ratio``),
    ``m = int(N / k_nonempty * class_balance_ratio)`` (the reference divides by all k centroids, empty ones included).
    Upper bounds n_j. x_j = clip(N·P_j + lambda, lb_j, n_j) with lambda by bisection so sum(x) = N, then
    largest-remainder rounding (ties to the more complex, then the lower cluster id): sum(quota) = N and
    lb <= quota <= n hold exactly, and for clusters with equal bounds a higher complexity never gets a smaller quota.
    As temperature grows P becomes uniform and the quotas equalise (water-filling: min(n_j, t) for a common t);
    they do not become size-proportional. As it shrinks P becomes one-hot: the most complex cluster takes the budget
    up to its size and the shift lambda spreads what is left evenly over the others (not in complexity order).
    Infeasible budgets (N < sum(lb) or N > sum(n)) raise ValueError naming the numbers. Returns int64 (k,).
    """
    c = np.asarray(complexity, dtype=np.float64)
    n = np.asarray(sizes)
    if c.ndim != 1 or n.shape != c.shape:
        raise ValueError(f"complexity and sizes must be 1-D of equal length, got {c.shape} and {n.shape}")
    if n.size and (not np.issubdtype(n.dtype, np.integer) or n.min() < 0):
        raise ValueError("sizes must be non-negative integers")
    n = n.astype(np.int64)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if min_per_cluster < 0:
        raise ValueError(f"min_per_cluster must be >= 0, got {min_per_cluster}")
    if not 0.0 <= class_balance_ratio <= 1.0:
        raise ValueError(f"class_balance_ratio must lie in [0, 1], got {class_balance_ratio!r}")
    total = int(n.sum())
    if (keep_fraction is None) == (budget is None):
        raise ValueError("give exactly one of keep_fraction and budget")
    if keep_fraction is not None:
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction!r}")
        target = int(math.floor(keep_fraction * total + 0.5))
    else:
        if int(budget) != budget:
            raise ValueError(f"budget must be an integer, got {budget!r}")
        target = int(budget)

    nonempty = n > 0
    if not np.isfinite(c[nonempty]).all():
        bad = np.flatnonzero(nonempty & ~np.isfinite(c))
        raise ValueError(f"complexity is NaN or infinite for non-empty clusters {bad[:5].tolist()} (fill it first)")
    m = min_per_cluster
    if class_balance_ratio > 0 and nonempty.any():
        m = int(target / int(nonempty.sum()) * class_balance_ratio)
    lb = np.where(nonempty, np.minimum(m, n - 1), 0)
    if target < lb.sum() or target > total:
        raise ValueError(f"infeasible DBP budget {target}: must lie between the sum of lower bounds {int(lb.sum())} "
                         f"(min_per_cluster / class balance) and the number of items {total}")
    quota = np.zeros(len(n), dtype=np.int64)
    if target == 0 or not nonempty.any():
        return quota

    p = np.zeros(len(n))
    p[nonempty] = _softmax(c[nonempty] / temperature)
    a = target * p
    lo_b, hi_b = lb.astype(np.float64), n.astype(np.float64)

    def kept(lam: float) -> np.ndarray:
        return np.clip(a + lam, lo_b, hi_b)

    # sum(kept(lam)) is continuous and non-decreasing; lo gives sum(lb) <= N, hi gives sum(n) >= N.
    lo, hi = float((lo_b - a).min()) - 1.0, float((hi_b - a).max()) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if kept(mid).sum() < target:
            lo = mid
        else:
            hi = mid
    x = kept(hi)
    # Exact rounding: floors, then hand the remaining units to the largest fractional parts.
    base = np.clip(np.floor(x + 1e-9), lb, n).astype(np.int64)
    rest = target - int(base.sum())
    frac = x - base
    # Ties in the remainder go to the more complex cluster (then the lower id): equal P from float rounding of
    # slightly different complexities must not reverse their order.
    cz = np.where(nonempty, c, -np.inf)
    if rest > 0:
        cand = np.flatnonzero(base < n)
        pick = cand[np.lexsort((cand, -cz[cand], -frac[cand]))[:rest]]
        base[pick] += 1
    elif rest < 0:
        cand = np.flatnonzero(base > lb)
        pick = cand[np.lexsort((-cand, cz[cand], frac[cand]))[:-rest]]
        base[pick] -= 1
    quota[:] = base
    assert quota.sum() == target and (quota >= lb).all() and (quota <= n).all()
    return quota


def dbp_select(
    emb: np.ndarray | None,
    cluster_ids: np.ndarray,
    centroids: np.ndarray,
    quotas: np.ndarray,
    *,
    keep: Literal["hard", "easy", "random"] = "hard",
    uids: np.ndarray | Sequence[str] | None = None,
    seed: int = 0,
    dist_to_centroid: np.ndarray | None = None,
) -> np.ndarray:
    """Keep ``quotas[j]`` items of each cluster j: the farthest from the centroid (keep="hard", the paper's choice).

    Distance ``1 - x·mu_j`` (unit rows and centroids; pass ``dist_to_centroid`` to reuse precomputed values).
    keep="easy" keeps the nearest, "random" a seeded random subset. Ties (equal distances) go to the smaller uid when ``uids`` is given, else to the smaller row index;
    with ``uids`` the selection does not depend on row order. Vectorised (one sort), no per-cluster loop.
    Returns a bool keep mask (n,) with exactly ``quotas[j]`` True in cluster j.
    """
    check_keep(keep)
    n, d = _shape(emb, cluster_ids, centroids, dist_to_centroid if keep != "random" else np.zeros(0))
    k = unit_centroids(centroids, d).shape[0]
    ids = check_cluster_ids(cluster_ids, n, k)
    q = np.asarray(quotas)
    sizes = np.bincount(ids, minlength=k)
    if q.shape != (k,) or (k and not np.issubdtype(q.dtype, np.integer)):
        raise ValueError(f"quotas must be an integer array of shape ({k},), got {q.dtype} {q.shape}")
    if (q < 0).any() or (q > sizes).any():
        bad = np.flatnonzero((q < 0) | (q > sizes))
        raise ValueError(f"quotas must lie in [0, cluster size]; clusters {bad[:5].tolist()} violate it")
    tie = uid_ranks(uids, n) if uids is not None else np.arange(n, dtype=np.int64)
    dist = _dist(emb, ids, centroids, dist_to_centroid) if keep != "random" else np.zeros(n)
    visit = np.lexsort((tie, rank_key(dist, tie, keep, seed), ids))
    starts = np.concatenate(([0], np.cumsum(sizes)))
    rank = np.empty(n, dtype=np.int64)
    rank[visit] = np.arange(n, dtype=np.int64) - np.repeat(starts[:-1], sizes)
    return rank < q[ids]


# ---- the curate step --------------------------------------------------------------------------------------------------


@step("dbp", reason="dbp_quota", scores=(Score("score_dbp_cluster_complexity", higher="more complex concept, larger quota"),),
      orientation="score_dbp_cluster_complexity: d_inter·d_intra of the row's cluster; higher = more complex concept, larger quota")
def step_dbp(
    ctx: ScoringContext,
    *,
    keep_fraction: Fraction,
    temperature: Positive = 0.1,
    n_neighbors: Count = 20,
    min_per_cluster: NonNegativeInt = 1,
    class_balance_ratio: Between(0, 1) = 0.0,
    keep: Keep = "hard",
) -> StepOutput:
    """Concept-complexity pruning (DBP, Abbas et al. ICLR 2024) on the rows still alive.

    Complexity C_j = d_inter·d_intra per cluster, quotas from softmax(C/τ) with one shift λ and exact
    rounding, then the quota farthest-from-centroid rows of each cluster are kept. With ctx.prior_complexity (append
    mode) a cluster's stored complexity replaces the one measured on these rows.
    score_dbp_cluster_complexity = C of the row's cluster: higher = more complex concept = more kept.
    """
    centroids = ctx.kmeans.centroids
    rows = np.flatnonzero(ctx.alive)
    clusters, uids = ctx.kmeans.assignment[rows], ctx.uids[rows]
    # Distances streamed once over all rows (a row's value does not depend on where it sits), then the alive rows':
    # no gathered copy of the embeddings, one pass instead of two.
    dist = distance_to_centroid(ctx.emb, ctx.kmeans.assignment, centroids)[rows]
    complexity = cluster_complexity(None, clusters, centroids, n_neighbors=min(n_neighbors, len(centroids) - 1),
                                    dist_to_centroid=dist)
    values, stored = complexity.complexity, 0
    if ctx.prior_complexity is not None:  # append mode: the complexity the previous version measured on all its rows
        prior = np.asarray(ctx.prior_complexity, dtype=np.float64)
        known = np.isfinite(prior) & (complexity.sizes > 0)
        values, stored = np.where(known, prior, values), int(known.sum())
    budget = budget_for(ctx, keep_fraction)
    quotas = dbp_quotas(
        values,
        complexity.sizes,
        budget=budget,
        temperature=temperature,
        min_per_cluster=min_per_cluster,
        class_balance_ratio=class_balance_ratio,
    )
    kept = dbp_select(None, clusters, centroids, quotas, keep=keep, uids=uids, seed=ctx.seed, dist_to_centroid=dist)
    n = len(ctx.uids)
    drop = np.zeros(n, dtype=bool)
    drop[rows[~kept]] = True
    table = [
        {"cluster": j, "size": int(complexity.sizes[j]), "d_intra": float(complexity.d_intra[j]),
         "d_inter": float(complexity.d_inter[j]), "complexity": float(values[j]), "quota": int(quotas[j])}
        for j in range(len(quotas))
    ]
    if ctx.prior_complexity is not None:
        info_extra = {"complexity_from": f"previous version for {stored} clusters, these rows for the other "
                                         f"{int((complexity.sizes > 0).sum()) - stored} non-empty ones"}
    else:
        info_extra = {}
    return StepOutput(
        scores={"score_dbp_cluster_complexity": scatter(n, rows, values[clusters])},
        drop=drop,
        info={"budget": budget, "temperature": temperature, "n_neighbors": n_neighbors, "quotas": table, **info_extra},
    )
