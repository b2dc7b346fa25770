"""SemDeDup: semantic deduplication inside concept clusters.

Method: "SemDeDup: Data-efficient learning at web-scale through semantic deduplication" (Abbas, Tirumala, Simig,
Ganguli, Morcos; 2023), reference code facebookresearch/SemDeDup. Embeddings are clustered with spherical k-means;
inside each cluster the items are ranked by spherical distance to the centroid, ``1 - x·mu`` (keep-hard: farthest
first). Item j is a semantic duplicate when its largest cosine similarity to any item ranked before it exceeds
``1 - eps``. Paper: LAION-440M, k = 50,000; eps = 0.00095 marks ~30% as duplicates, eps = 0.03 ~50%.

Rule, as in the reference (``torch.triu(E Eᵀ, 1).max(dim=0)``): item j is compared with ALL items ranked before it,
whether or not those were themselves marked duplicates. So for a chain A~B, B~C, A≁C ranked A, B, C, both B
(duplicate of A) and C (duplicate of B) are dropped, and C's ``dup_of`` points at B, which is dropped too.
A "compare only with kept items" rule is not offered: it makes each decision depend on earlier decisions *at that
eps*, so several eps could no longer share one pass and the work would become sequential per item.

Score orientation: ``max_sim`` is a redundancy measure (higher = more redundant = LESS worth keeping; ``-inf`` for an
item with nothing ranked before it). The decisions are the boolean ``duplicate`` masks (True = drop).

Implementation: per cluster, the similarities to earlier-ranked items are computed in column batches of
``batch_size`` items against row tiles, keeping a running max and argmax, so memory is O(batch_size x row_tile), never
n x n, and only the upper triangle is computed (about n²/2 dot products). Products in fp32 (TF32 off on GPU):
fp16/bf16 cannot resolve eps ~ 1e-3.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scorers.arrays import check_emb, check_keep, rank_key, uid_ranks
from scorers.device import select_device
from scorers.lazy import lazy_module
from scorers.step import Between, Count, Fraction, Score, ScoringContext, StepOutput, alive_view, scatter, step

from scorers.prototypes import (
    check_cluster_ids,
    distance_to_centroid,
    fp32_matmul,
    unit_centroids,
)

# Imported on first use, not when config validation imports this module (scorers/lazy.py).
torch = lazy_module("torch")

__all__ = [
    "SemDedupResult",
    "eps_for_keep_fraction",
    "rank_in_cluster",
    "semdedup",
    "semdedup_cluster",
    "split_giant_clusters",
]

Keep = Literal["hard", "easy", "random"]

# Rows gathered and cast at a time when loading one cluster.
_GATHER_ROWS = 16384

# A row tile holds at most this many similarities (128 MB of float32), whatever batch_size is.
_TILE_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class SemDedupResult:
    """Per-row SemDeDup output (rows in the input order).

    max_sim: float32, the largest cosine similarity to an item ranked before it in its cluster; ``-inf`` for the
        first-ranked item of each cluster (nothing before it). Higher = more redundant.
    dup_of: int64 row index of the item attaining ``max_sim`` (ties: the higher-ranked one) for rows that are
        duplicates at the largest eps; -1 elsewhere (the argmax is not computed for the others, to save time).
        :meth:`dup_of_at` narrows it to a smaller eps.
    rank: int64 position inside the cluster's order (0 = most worth keeping).
    dist_to_centroid: float32 ``1 - x·mu`` to the row's own centroid (the ranking key).
    duplicate: eps -> bool mask, True = semantic duplicate (drop), i.e. ``max_sim > 1 - eps``.
    """

    max_sim: np.ndarray
    dup_of: np.ndarray
    rank: np.ndarray
    dist_to_centroid: np.ndarray
    duplicate: dict[float, np.ndarray] = field(default_factory=dict)

    def dup_of_at(self, eps: float) -> np.ndarray:
        """``dup_of`` where the row is a duplicate at ``eps``, -1 elsewhere."""
        return np.where(duplicate_mask(self.max_sim, eps), self.dup_of, -1)


def duplicate_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """The SemDeDup decision: True where ``max_sim > 1 - eps`` (compared in float64)."""
    return np.asarray(max_sim, dtype=np.float64) > 1.0 - _check_eps(eps)


def _check_eps(eps: float) -> float:
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return e








def rank_in_cluster(
    dist_to_centroid: np.ndarray,
    uids: np.ndarray | Sequence[str],
    *,
    keep: Keep = "hard",
    seed: int = 0,
) -> np.ndarray:
    """Visiting order of one cluster's items (positions into the inputs; element 0 = most worth keeping).

    keep="hard": farthest from the centroid first (the reference default); "easy": nearest first;
    "random": a permutation seeded by ``seed`` of the items in uid order. Ties (equal distances, e.g. exact
    duplicates) are broken by uid in string order, so the result is deterministic and does not depend on row order.
    """
    check_keep(keep)
    dist = np.asarray(dist_to_centroid, dtype=np.float64)
    if dist.ndim != 1:
        raise ValueError(f"dist_to_centroid must be 1-D, got shape {dist.shape}")
    uid_rank = uid_ranks(uids, len(dist))
    return np.lexsort((uid_rank, rank_key(dist, uid_rank, keep, seed))).astype(np.int64)


def _check_order(order: np.ndarray, n: int) -> np.ndarray:
    o = np.asarray(order)
    if o.shape != (n,) or (n and not np.issubdtype(o.dtype, np.integer)):
        raise ValueError(f"order must be an integer array of shape ({n},), got {o.dtype} {o.shape}")
    o = o.astype(np.int64, copy=False)
    if n and (o.min() < 0 or o.max() >= n or np.bincount(o, minlength=n).max() != 1):
        raise ValueError("order must be a permutation of range(n)")
    return o


def _diag_mask(size: int, dev: torch.device) -> torch.Tensor:
    """mask[j, q] = q >= j: within a diagonal block, the earlier-item slots that are not earlier (built once a call)."""
    return torch.ones(size, size, dtype=torch.bool, device=dev).triu_()


def _prior_max(
    e: torch.Tensor, batch_size: int, prior_above: float = -math.inf, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows already in rank order, max similarity to (and argmax among) the rows ranked before each one.

    Columns (the items being judged) are processed ``batch_size`` at a time against row tiles of at most
    ``_TILE_ELEMENTS / batch_size`` earlier items, with a running max across tiles, so peak extra memory is one
    (batch x tile) block. Each block is laid out (judged item, earlier item) so the reduction runs along contiguous
    memory, and the max is taken with ``amax``; the costlier argmax is computed only for items whose running max
    improved and exceeds ``prior_above`` (their index is -1 otherwise). Ties go to the higher-ranked (earlier) row:
    strict ``>`` across tiles and torch's first-occurrence argmax within one.
    """
    n = e.shape[0]
    dev = e.device
    if mask is None or mask.shape[0] < min(n, batch_size):
        mask = _diag_mask(min(n, batch_size), dev)
    vals = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    idx = torch.full((n,), -1, dtype=torch.int64, device=dev)
    row_tile = max(batch_size, _TILE_ELEMENTS // batch_size)
    # The comparison below runs in float32: step just under float32(prior_above) so that no value above
    # prior_above (in float64) escapes tracking; callers mask the few extra ones.
    track_above = float(np.nextafter(np.float32(prior_above), np.float32(-np.inf))) if math.isfinite(prior_above) \
        else prior_above
    for s in range(0, n, batch_size):
        t = min(s + batch_size, n)
        cols = e[s:t]
        best_v = vals[s:t]  # views: updated in place
        best_i = idx[s:t]
        for r0 in range(0, t - 1, row_tile):  # an earlier row i satisfies i < j <= t - 1
            r1 = min(r0 + row_tile, t - 1)
            sims = cols @ e[r0:r1].T  # (judged items, earlier items)
            if r1 > s:  # the tile reaches the diagonal: hide earlier-item slots i >= j (only columns i >= s can)
                sims[:, s - r0:].masked_fill_(mask[:t - s, :r1 - s], -math.inf)
            tile_max = sims.amax(dim=1)
            better = tile_max > best_v
            track = torch.nonzero(better & (tile_max > track_above))[:, 0]
            if track.numel():
                best_i[track] = sims[track].argmax(dim=1) + r0
            best_v.copy_(torch.where(better, tile_max, best_v))
    return vals, idx


def _to_unit_tensor(rows: np.ndarray, dev: torch.device) -> torch.Tensor:
    """float32 tensor on ``dev`` with rows re-normalised (float16 storage rounding otherwise shifts sims by ~1e-4)."""
    host = np.ascontiguousarray(rows, dtype=np.float32)
    if dev.type == "cpu" and np.shares_memory(host, rows):
        host = host.copy()  # normalised in place below: never write into the caller's array
    x = torch.from_numpy(host).to(dev)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bool(bad.any()):
        raise ValueError(f"emb has {int(bad.sum())} zero or non-finite rows")
    return x.div_(norms)  # in place: one float32 copy of the cluster, not two


def _dist_rows(e: torch.Tensor, mu: torch.Tensor) -> np.ndarray:
    """``1 - e·mu`` per row, bit-identical for identical rows wherever they sit (so exact copies tie, and uid decides).

    A BLAS matrix-vector product may treat rows differently by position (blocking, remainder paths); ``np.einsum``
    does not (checked across positions and alignments), and on GPU an elementwise product reduced per row is used.
    """
    if e.device.type == "cpu":
        return (1.0 - np.einsum("ij,j->i", e.numpy(), mu.numpy())).astype(np.float32)
    return (1.0 - (e * mu).sum(dim=1)).cpu().numpy()


def semdedup_cluster(
    emb: np.ndarray,
    *,
    order: np.ndarray,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    prior_above: float = -math.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup pairwise step for ONE cluster: for each item, the max similarity to any item ranked before it.

    ``emb``: the cluster's rows (n x d, unit-norm, float16/float32; re-normalised in fp32). ``order``: visiting order
    (``order[0]`` = rank 0 = most worth keeping), e.g. from :func:`rank_in_cluster`.
    Returns, indexed like ``emb``'s rows: ``max_sim`` (float32; ``-inf`` for rank 0, nothing before it) and
    ``nearest_prior`` (int64 row of the argmax, ties to the higher-ranked row; -1 for rank 0, and -1 where
    ``max_sim <= prior_above``: pass ``1 - eps`` to skip the argmax work for items that are not duplicates anyway).
    Item j is a duplicate at eps iff ``max_sim[j] > 1 - eps`` (compared against all earlier items, dropped or not).
    Memory O(batch_size x row tile), time O(n² d / 2); never an n x n matrix.
    """
    check_emb(emb)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = emb.shape[0]
    o = _check_order(order, n)
    if math.isnan(prior_above):
        raise ValueError("prior_above must not be NaN")
    dev = select_device(device)
    max_sim = np.full(n, -np.inf, dtype=np.float32)
    prior = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return max_sim, prior
    with fp32_matmul():
        vals, idx = _prior_max(_to_unit_tensor(np.asarray(emb)[o], dev), batch_size, float(prior_above))
    idx_np = idx.cpu().numpy()
    max_sim[o] = vals.cpu().numpy()
    prior[o] = np.where(idx_np >= 0, o[np.maximum(idx_np, 0)], -1)
    prior[max_sim.astype(np.float64) <= prior_above] = -1
    return max_sim, prior


def semdedup(
    emb: np.ndarray,
    cluster_ids: np.ndarray,
    centroids: np.ndarray,
    uids: np.ndarray | Sequence[str],
    *,
    eps: float | Sequence[float],
    keep: Keep = "hard",
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> SemDedupResult:
    """SemDeDup over a whole dataset (Abbas et al. 2023): rank inside each cluster, then mark semantic duplicates.

    ``emb`` (n x d unit rows, float16/float32, may be a memmap), ``cluster_ids`` (n,) in [0, k), ``centroids`` (k x d;
    spherical k-means centroids, re-normalised here), ``uids`` (n,) unique strings for the tie-break.
    Ranking: ``1 - x·mu`` to the own centroid, keep="hard" farthest first (the paper's default), "easy" nearest first,
    "random" a seeded permutation of uid order; ties by uid. Several ``eps`` share one pass: the pairwise work yields
    ``max_sim`` once and each mask is a threshold on it. A row's result depends only on its cluster's rows and uids,
    never on row order, so reading shards in another order gives the same duplicates.

    Giant clusters are processed exactly, without splitting: the column-batched running max needs O(batch x tile)
    memory at any cluster size; only time grows (n²/2 dot products). See :func:`split_giant_clusters` for trading
    a little recall for time. Orientation and rule: see the module docstring.
    """
    check_emb(emb)
    check_keep(keep)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eps_list = [_check_eps(e) for e in ([eps] if np.ndim(eps) == 0 else list(np.ravel(eps)))]
    if not eps_list:
        raise ValueError("eps must be a number or a non-empty sequence of numbers")
    n, d = emb.shape
    mu = unit_centroids(centroids, d)
    k = mu.shape[0]
    ids = check_cluster_ids(cluster_ids, n, k)
    uid_rank = uid_ranks(uids, n)
    dev = select_device(device)
    rand_key = rank_key(np.zeros(n), uid_rank, "random", seed) if keep == "random" else None

    # Rows grouped by cluster, in uid order inside each group: a canonical order that does not depend on how the
    # rows were laid out, so every float computed below is bit-identical under any row permutation.
    grouped = np.lexsort((uid_rank, ids))
    sizes = np.bincount(ids, minlength=k)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    max_sim = np.full(n, -np.inf, dtype=np.float32)
    dup_of = np.full(n, -1, dtype=np.int64)
    rank = np.zeros(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    singles = grouped[starts[:-1][sizes == 1]]  # nothing to compare: only the distance is needed
    if len(singles):
        singles.sort()
        dist[singles] = distance_to_centroid(np.asarray(emb[singles]), ids[singles], mu)
    prior_above = 1.0 - max(eps_list)  # dup_of only matters for duplicates; skip the argmax elsewhere
    mu_t = torch.from_numpy(mu.astype(np.float32)).to(dev)
    mask = _diag_mask(int(min(batch_size, sizes.max(initial=1))), dev)
    with fp32_matmul():
        for c in np.flatnonzero(sizes >= 2):
            rows = grouped[starts[c]:starts[c + 1]]
            # Two chunked passes instead of whole-cluster copies: distances first, then the rows gathered straight
            # into rank order in one float32 buffer. Per-row values are the same as normalising the whole cluster
            # at once (row-wise norm and einsum), so the result is unchanged; the extra memory of a 200k-item
            # cluster drops from ~4 copies of it (fp16 gathers, fp32 copy, reordered copy) to one.
            dc = np.empty(len(rows), dtype=np.float32)
            for s in range(0, len(rows), _GATHER_ROWS):
                dc[s:s + _GATHER_ROWS] = _dist_rows(_to_unit_tensor(np.asarray(emb[rows[s:s + _GATHER_ROWS]]), dev), mu_t[c])
            key = -dc if keep == "hard" else dc if keep == "easy" else rand_key[rows]
            order = np.argsort(key, kind="stable")  # stable: ties keep uid order
            e = torch.empty((len(rows), d), dtype=torch.float32, device=dev)
            for s in range(0, len(rows), _GATHER_ROWS):
                e[s:s + _GATHER_ROWS] = _to_unit_tensor(np.asarray(emb[rows[order[s:s + _GATHER_ROWS]]]), dev)
            vals, idx = _prior_max(e, batch_size, prior_above, mask)
            del e
            ranked = rows[order]
            idx_np = idx.cpu().numpy()
            max_sim[ranked] = vals.cpu().numpy()
            dup_of[ranked] = np.where(idx_np >= 0, ranked[np.maximum(idx_np, 0)], -1)
            rank[ranked] = np.arange(len(rows))
            dist[rows] = dc

    duplicate = {e: duplicate_mask(max_sim, e) for e in eps_list}
    dup_of[~duplicate[max(eps_list)]] = -1
    return SemDedupResult(
        max_sim=max_sim,
        dup_of=dup_of,
        rank=rank,
        dist_to_centroid=dist,
        duplicate=duplicate,
    )


def eps_for_keep_fraction(max_sim: np.ndarray, target_keep_fraction: float) -> float:
    """The eps whose kept fraction (``max_sim <= 1 - eps``) on ``max_sim`` is closest to ``target_keep_fraction``.

    The paper tunes eps by bisection on a sample of clusters; here it is solved exactly instead: the kept fraction is
    a step function of the threshold, so the candidate thresholds are the distinct values of ``max_sim`` and the
    returned threshold is the midpoint between the chosen value and the next one (robust to float rounding).
    Pass the ``max_sim`` of a random sample of whole clusters (SemDeDup run on them). ``-inf`` entries (first-ranked
    items) are always kept. Ties in achievable fractions go to the larger kept fraction (the smaller eps).
    The result is clamped at 0 (eps must be >= 0): a target that needs a threshold above 1 gets eps = 0, which keeps
    everything except pairs whose fp32 similarity rounds above 1.
    """
    ms = np.asarray(max_sim, dtype=np.float64).ravel()
    if ms.size == 0:
        raise ValueError("max_sim is empty")
    if np.isnan(ms).any() or np.isposinf(ms).any():
        raise ValueError("max_sim must not contain NaN or +inf")
    f = float(target_keep_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"target_keep_fraction must lie in [0, 1], got {target_keep_fraction!r}")
    finite = np.sort(ms[np.isfinite(ms)])
    always = ms.size - finite.size  # -inf rows: kept at any eps
    values, counts = np.unique(finite, return_counts=True)
    # Threshold t keeps `always + #(finite <= t)`. Option 0: t below every finite value; option i: t in [v_i, v_{i+1}).
    kept = always + np.concatenate(([0], np.cumsum(counts)))
    target = f * ms.size
    gap = np.abs(kept - target)
    best = int(np.flatnonzero(gap == gap.min())[-1])  # ties -> keep more
    if values.size == 0:
        return 0.0  # nothing can be a duplicate; any eps keeps everything
    if best == 0:
        t = values[0] - max(1e-6, 1e-6 * abs(values[0]))
    elif best == values.size:
        t = values[-1] + max(1e-6, 1e-6 * abs(values[-1]))
    else:
        t = 0.5 * (values[best - 1] + values[best])
    return max(0.0, float(1.0 - t))


def split_giant_clusters(
    emb: np.ndarray,
    cluster_ids: np.ndarray,
    centroids: np.ndarray,
    *,
    max_cluster_size: int = 50_000,
    uids: np.ndarray | Sequence[str] | None = None,
    niter: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Optional: re-cluster every cluster larger than ``max_cluster_size`` with faiss spherical k-means.

    Not needed for memory: :func:`semdedup` handles any cluster size exactly with the column-batched running max.
    This is a time trade-off only (work per cluster is quadratic: splitting one 200k cluster into 8 parts cuts its
    pairwise work ~8x), and it has a recall cost: near-duplicates lying on either side of a new boundary land in
    different sub-clusters and are never compared. That is why the default path does not split.

    Each oversized cluster c of n items gets ``min(n, 2 * ceil(n / max_cluster_size))`` sub-clusters; the first keeps
    id c (with its new centroid), the others get fresh ids k, k+1, ... Pass ``uids`` to train on the members in uid
    order, which makes the split independent of row order. Returns (new cluster ids int64 (n,), new centroids
    float32 (k', d), unit-norm).
    """
    import faiss  # local import: only this optional path needs faiss

    check_emb(emb)
    if max_cluster_size < 1:
        raise ValueError(f"max_cluster_size must be >= 1, got {max_cluster_size}")
    n, d = emb.shape
    cent = unit_centroids(centroids, d).astype(np.float32)
    k = cent.shape[0]
    ids = check_cluster_ids(cluster_ids, n, k)
    uid_rank = uid_ranks(uids, n) if uids is not None else np.arange(n, dtype=np.int64)
    new_ids = ids.copy()
    new_cent = [cent]
    next_id = k
    for c in np.flatnonzero(np.bincount(ids, minlength=k) > max_cluster_size):
        members = np.flatnonzero(ids == c)
        members = members[np.argsort(uid_rank[members], kind="stable")]
        x = _to_unit_tensor(np.asarray(emb[members]), torch.device("cpu")).numpy()
        n_sub = min(len(members), 2 * math.ceil(len(members) / max_cluster_size))
        km = faiss.Kmeans(d, n_sub, niter=niter, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, math.ceil(len(members) / n_sub)))
        km.train(x)
        _, assign = km.index.search(x, 1)
        sub = assign[:, 0].astype(np.int64)
        sub_cent = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
        ids_for_sub = np.concatenate(([c], np.arange(next_id, next_id + n_sub - 1)))
        new_ids[members] = ids_for_sub[sub]
        cent[c] = sub_cent[0]
        new_cent.append(sub_cent[1:].astype(np.float32))
        next_id += n_sub - 1
    return new_ids, np.concatenate(new_cent, axis=0)


# ---- the curate step --------------------------------------------------------------------------------------------------

Eps = Between(0, 2)  # a cosine-distance threshold: 1 - similarity lies in [0, 2]


@step("semdedup", reason="semdedup", exactly_one=(("eps", "target_keep_of_entering"),),
      renamed={"target_keep_fraction": "use target_keep_of_entering, a fraction of the rows entering this step "
                                        "(keep_fraction elsewhere is a fraction of all rows)"},
      scores=(Score("score_semdedup", higher="more redundant"),),
      orientation="score_semdedup: max cosine similarity to a higher-ranked row of the same cluster; higher = more redundant")
def step_semdedup(
    ctx: ScoringContext,
    *,
    eps: Eps | None = None,
    target_keep_of_entering: Fraction | None = None,
    eps_grid: list[Eps] | None = None,
    keep: Keep = "hard",
    batch_size: Count = 4096,
) -> StepOutput:
    """SemDeDup inside each concept cluster on the rows still alive.

    One pass computes every row's max similarity to a higher-ranked row of its cluster; `eps` (or the eps
    that keeps `target_keep_of_entering` of the rows entering this step, solved exactly) decides, and the kept
    count for every eps of `eps_grid` goes to run.json. score_semdedup = that max similarity (-1 for the
    first-ranked row of a cluster, compared with nothing; null in the manifest for rows that never entered): higher = more redundant.
    """
    rows, emb, clusters, uids = alive_view(ctx)
    grid = sorted({float(e) for e in (eps_grid or [])} | ({float(eps)} if eps is not None else set()))
    # dup_of is resolved up to the largest eps passed; when eps is solved for afterwards, pass the widest (2.0).
    widest = [2.0] if eps is None else []
    result = _semdedup_fanned_out(ctx, emb, clusters, uids, eps=grid + widest, keep=keep, batch_size=batch_size)
    if eps is None:
        eps = eps_for_keep_fraction(result.max_sim, target_keep_of_entering)
    is_dup = duplicate_mask(result.max_sim, eps)
    dup_local = result.dup_of_at(eps)
    n = len(ctx.uids)
    drop = np.zeros(n, dtype=bool)
    drop[rows[is_dup]] = True
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_of[rows[is_dup]] = rows[dup_local[is_dup]]
    # the first-ranked row of a cluster was compared with nothing: -1, the lowest cosine similarity, so it sorts and
    # filters as the least redundant (NaN would sort above every number in Polars and pass `score > 0.9`)
    max_sim = np.where(np.isfinite(result.max_sim), result.max_sim, -1.0)
    curve = {f"{e:g}": int((~duplicate_mask(result.max_sim, e)).sum()) for e in grid}
    return StepOutput(
        scores={"score_semdedup": scatter(n, rows, max_sim)},
        drop=drop,
        dup_of=dup_of,
        info={"eps": float(eps), "keep": keep, "entering": len(rows), "kept_by_eps": curve},
    )


def _semdedup_fanned_out(ctx: ScoringContext, emb: Any, clusters: np.ndarray, uids: np.ndarray, **knobs: Any) -> Any:
    """SemDeDup over batches of whole clusters, as tasks on the run's task runner when there is one.

    A row's result depends only on its own cluster (ranked in uid order, ties by uid), so running batches of
    clusters separately and scattering back gives exactly the one-call result. keep: random ranks by a
    permutation of the uid order of all rows, so it runs as one call.
    """
    common = {"centroids": ctx.kmeans.centroids, "device": ctx.device, "seed": ctx.seed, **knobs}
    batches = cluster_batches(clusters, ctx.cluster_batches) if ctx.fan_out is not None and knobs["keep"] != "random" else []
    if len(batches) < 2:
        return semdedup(emb, clusters, uids=uids, **common)
    gather = emb.subset if hasattr(emb, "subset") else emb.__getitem__  # a lazy store view travels as paths
    parts = ctx.fan_out(semdedup, [{"emb": gather(rows), "cluster_ids": clusters[rows], "uids": uids[rows], **common} for rows in batches])
    n = len(clusters)
    out = SemDedupResult(max_sim=np.empty(n, np.float32), dup_of=np.empty(n, np.int64), rank=np.empty(n, np.int64),
                         dist_to_centroid=np.empty(n, np.float32), duplicate={e: np.empty(n, bool) for e in parts[0].duplicate})
    for rows, part in zip(batches, parts):
        out.max_sim[rows] = part.max_sim
        out.dup_of[rows] = np.where(part.dup_of >= 0, rows[np.maximum(part.dup_of, 0)], -1)
        out.rank[rows] = part.rank
        out.dist_to_centroid[rows] = part.dist_to_centroid
        for e, mask in part.duplicate.items():
            out.duplicate[e][rows] = mask
    return out


def cluster_batches(clusters: np.ndarray, n_batches: int) -> list[np.ndarray]:
    """Row indices cut into at most n_batches groups of whole clusters with about equal pairwise work (Σ size²).

    Greedy: largest cluster first, into the lightest batch. Rows inside a batch are in ascending order.
    """
    sizes = np.bincount(clusters)
    present = np.flatnonzero(sizes)
    n_batches = max(1, min(n_batches, len(present)))
    load = np.zeros(n_batches)
    batch_of = np.empty(len(sizes), dtype=np.int64)
    for c in present[np.argsort(-sizes[present], kind="stable")]:
        b = int(np.argmin(load))
        batch_of[c] = b
        load[b] += float(sizes[c]) ** 2
    row_batch = batch_of[clusters]
    return [rows for b in range(n_batches) if len(rows := np.flatnonzero(row_batch == b))]
