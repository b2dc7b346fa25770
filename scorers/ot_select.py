"""Optimal-transport targeted selection (TAROT-style): score pool samples by how cheaply they transport onto a target set.

Method
------
TAROT (Feng, Nie, Liu, Alahi, "TAROT: Targeted Data Selection via Optimal Transport", arXiv 2412.00420;
vita-epfl/TAROT) selects the pool subset whose optimal-transport distance to a small target set is smallest, on
*whitened* features (whitening removes the few dominant directions that otherwise decide every distance), and picks
how much to select by minimising that OT distance to held-out folds of the target. The per-sample values come from the
OT dual potentials, as in LAVA (Just et al., ICLR 2023) and GOT-D (Kang et al., ICLR 2024): the pool-side potential
f(x) is the marginal cost of moving mass from x to the target, so points with low f are the ones the target "wants".

How it scales: the dual problem is solved once, by POT (``ot.sinkhorn_log`` for entropic OT, ``ot.emd`` for exact OT),
between a *sample* of the pool and the target. Every pool row is then scored by the c-transform of the target-side
potential g, streamed in row chunks, so memory is ``chunk x |T|`` and never ``N x |T|``:

    soft (eps > 0):  f(x) = -eps * log sum_t exp((g_t - c(x, t)) / eps)      (the Sinkhorn update itself)
    hard (eps = 0):  f(x) = min_t c(x, t) - g_t                               (exact-OT c-transform)

with c(x, t) = ||x - t||^2 / s on whitened features and s the mean cost between the pool sample and the target (so eps
is relative to a typical cost and one default fits any feature scale). On the sample points this f equals POT's own
pool potential up to the additive constant eps * log(1/m) (soft) or exactly (hard).

Orientation: low potential = cheap to move onto the target = useful. ``score = -f``, so **higher is better**, and a
fixed-budget selection is the top-k by score. ``estimate_selection_ratio`` implements TAROT's second mode (OT-distance
minimisation over target folds with per-target neighbourhoods; the ratio is an output). ``fit_proxy_head`` and
``gradient_features`` give TAROT/LESS-style features: JL-projected per-sample gradients of a proxy linear head.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from scorers.arrays import check_emb, encode_labels, unit_rows
from scorers.device import select_device

from scorers.step import (
    Count, Fraction, NonNegative, Score, ScoringContext, SourceMapping, StepOutput, require_labels, scatter, select_among_alive, step,
    target_key,
)

__all__ = [
    "Whitening",
    "fit_whitening",
    "OTScores",
    "target_potential",
    "c_transform",
    "ot_scores",
    "RatioEstimate",
    "estimate_selection_ratio",
    "ProxyHead",
    "fit_proxy_head",
    "gradient_features",
]

# The largest chunk x |T| block held at once (float32 elements): 2^25 = 128 MiB.
_MAX_BLOCK_ELEMS = 1 << 25


# ----------------------------------------------------------------------------------------------------------------------
# Whitening
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Whitening:
    """An affine map x -> (x - mean) @ matrix fitted so that the fitted sample has (ridged) identity covariance."""

    mean: np.ndarray  # [d] float64
    matrix: np.ndarray  # [d, d] float64
    method: str
    ridge: float

    def apply(self, x: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
        """Whitens ``x [n, d]`` chunk by chunk (fp64 arithmetic per chunk), returning float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x must have shape [n, {self.mean.shape[0]}], got {x.shape}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        out = np.empty(x.shape, dtype=np.float32)
        for s in range(0, x.shape[0], chunk):
            out[s:s + chunk] = (np.asarray(x[s:s + chunk], dtype=np.float64) - self.mean) @ self.matrix
        return out


def fit_whitening(x_sample: np.ndarray, *, method: Literal["zca", "cholesky"] = "zca",
                  ridge: float = 1e-3) -> Whitening:
    """Fits a whitening map on ``x_sample [n, d]`` in fp64.

    The covariance gets ``ridge * trace(C) / d`` added to its diagonal (ridge relative to the mean variance, so the knob
    is scale-free) before inversion; directions with almost no variance are thus not blown up to unit variance.
    ``zca``: matrix = V diag(1/sqrt(lambda + r)) V^T (symmetric; stays closest to the original axes).
    ``cholesky``: C + rI = L L^T, matrix = L^{-T} (TAROT's choice; cheaper, not rotation-invariant).
    """
    x = np.asarray(x_sample, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x_sample must be 2-D [n, d], got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"x_sample needs at least 2 rows to estimate a covariance, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x_sample contains NaN or inf")
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    r = ridge * float(np.trace(cov)) / d
    if r == 0.0 and ridge > 0:  # constant sample: any positive ridge keeps the inverse defined
        r = ridge
    cov_r = cov + r * np.eye(d)
    if method == "zca":
        lam, vec = np.linalg.eigh(cov_r)
        lam = np.maximum(lam, np.finfo(np.float64).tiny)
        matrix = (vec / np.sqrt(lam)) @ vec.T
    elif method == "cholesky":
        try:
            chol = np.linalg.cholesky(cov_r)
        except np.linalg.LinAlgError as e:
            raise ValueError(f"covariance is not positive definite with ridge={ridge}; raise the ridge") from e
        # (x - m) @ L^{-T} has covariance L^{-1} C L^{-T} = I.
        matrix = np.linalg.inv(chol).T
    else:
        raise ValueError(f"method must be 'zca' or 'cholesky', got {method!r}")
    return Whitening(mean=mean, matrix=matrix, method=method, ridge=ridge)


# ----------------------------------------------------------------------------------------------------------------------
# Potentials and streamed scores
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OTScores:
    """Per-pool-row scores (higher = more useful for the target) and what produced them."""

    score: np.ndarray  # [N] float32, = -f(x)
    info: dict[str, Any] = field(default_factory=dict)
    whitening: Whitening | None = None
    target_potential: np.ndarray | None = None  # g on the (whitened, subsampled) target, float64
    target_points: np.ndarray | None = None  # the target rows g lives on (whitened), float32




def _sq_dists(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [n, m] in fp64 (small problems only)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    d = (x * x).sum(1)[:, None] + (t * t).sum(1)[None, :] - 2.0 * x @ t.T
    return np.maximum(d, 0.0)


def c_transform(x: np.ndarray, target: np.ndarray, g: np.ndarray, *, eps: float, cost_scale: float = 1.0,
                chunk: int = 65536, device: str = "auto") -> np.ndarray:
    """Pool-side potential f(x) from the target potential g, for every row of ``x``, streamed in row chunks.

    soft (eps > 0): f(x) = -eps * logsumexp_t((g_t - c(x, t)) / eps); hard (eps == 0): f(x) = min_t c(x, t) - g_t,
    with c(x, t) = ||x - t||^2 / cost_scale. Uses torch (CUDA when available, else CPU); never holds more than
    ``chunk x |T|`` costs (chunk is lowered further so one block stays under 2^25 elements). Returns float64 [n].
    """
    import torch

    x = np.asarray(x)
    target = np.asarray(target)
    g = np.asarray(g, dtype=np.float64)
    if x.ndim != 2 or target.ndim != 2 or x.shape[1] != target.shape[1]:
        raise ValueError(f"x [n, d] and target [m, d] must share d, got {x.shape} and {target.shape}")
    if g.shape != (target.shape[0],):
        raise ValueError(f"g must have shape ({target.shape[0]},), got {g.shape}")
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if cost_scale <= 0:
        raise ValueError(f"cost_scale must be > 0, got {cost_scale}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = select_device(device)
    # fp64 on CPU (cheap there, and makes streamed == dense to round-off); fp32 on GPU where fp64 is slow.
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    rows = max(1, min(chunk, _MAX_BLOCK_ELEMS // max(1, target.shape[0])))
    t = torch.as_tensor(np.asarray(target, dtype=np.float64), device=dev).to(dtype)
    t_sq = (t * t).sum(1)
    g_t = torch.as_tensor(g, device=dev).to(dtype)
    out = np.empty(x.shape[0], dtype=np.float64)
    with torch.no_grad():
        for s in range(0, x.shape[0], rows):
            xb = torch.as_tensor(np.asarray(x[s:s + rows], dtype=np.float64), device=dev).to(dtype)
            cost = ((xb * xb).sum(1)[:, None] + t_sq[None, :] - 2.0 * xb @ t.T).clamp_min_(0.0) / cost_scale
            if eps > 0:
                f = -eps * torch.logsumexp((g_t[None, :] - cost) / eps, dim=1)
            else:
                f = (cost - g_t[None, :]).min(dim=1).values
            out[s:s + rows] = f.double().cpu().numpy()
    return out


def target_potential(pool_sample: np.ndarray, target: np.ndarray, *, eps: float, cost_scale: float | None = None,
                     num_iter: int = 2000, stop_thr: float = 1e-7) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solves OT between uniform measures on ``pool_sample`` and ``target`` with POT; returns (f, g, info).

    eps > 0: ``ot.sinkhorn_log`` (log-domain Sinkhorn, stable at small eps), f = eps*log_u, g = eps*log_v.
    eps == 0: ``ot.emd`` (network simplex), f, g = its dual variables. Costs are ||x - t||^2 / cost_scale
    (cost_scale defaults to the mean cost of this pair, recorded in info).
    """
    import ot

    cost = _sq_dists(pool_sample, target)
    scale = float(cost.mean()) if cost_scale is None else float(cost_scale)
    if not scale > 0:
        raise ValueError("pool sample and target coincide (mean cost 0); OT scores are undefined")
    cost /= scale
    m, n_t = cost.shape
    a = np.full(m, 1.0 / m)
    b = np.full(n_t, 1.0 / n_t)
    info: dict[str, Any] = {"cost_scale": scale, "eps": eps}
    if eps > 0:
        _, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=num_iter, stopThr=stop_thr, log=True,
                                         warn=False)
        f = eps * np.asarray(log["log_u"], dtype=np.float64)
        g = eps * np.asarray(log["log_v"], dtype=np.float64)
        info["solver"] = "ot.bregman.sinkhorn_log"
        info["iterations"] = int(log["niter"]) + 1
        info["marginal_err"] = float(log["err"][-1]) if log["err"] else float("nan")
        info["converged"] = info["marginal_err"] < stop_thr
    else:
        _, log = ot.emd(a, b, cost, log=True)
        f = np.asarray(log["u"], dtype=np.float64)
        g = np.asarray(log["v"], dtype=np.float64)
        info["solver"] = "ot.emd"
        info["ot_cost"] = float(log["cost"])
    return f, g, info




def ot_scores(pool_emb: np.ndarray, target_emb: np.ndarray, *, eps: float = 0.05, whiten: bool = True,
              whitening_method: Literal["zca", "cholesky"] = "zca", ridge: float = 1e-3, sample_size: int = 5000,
              target_sample_size: int = 5000, chunk: int = 65536, seed: int = 0, device: str = "auto",
              num_iter: int = 2000, normalize: bool = False) -> OTScores:
    """TAROT/LAVA per-sample OT scores of every pool row toward ``target_emb``; **higher = more useful**.

    1. (``whiten``) fit a whitening map on a seeded sample of ``sample_size`` pool rows; apply it to pool and target.
    2. Solve OT (entropic at ``eps`` relative to the mean cost, exact when ``eps == 0``) between that pool sample and
       the target (subsampled to ``target_sample_size`` rows if larger) with POT; keep the target potential g.
    3. Stream the c-transform of g over all pool rows in chunks of ``chunk`` rows: score = -f(x).
    The pool may be a memory-mapped array; only ``chunk`` rows are whitened and scored at a time.
    ``normalize``: scale rows to unit norm after whitening (TAROT does this for gradient features, whose magnitude
    mostly says how confidently the proxy head fits a row, not which domain it is from).
    """
    t0 = time.perf_counter()
    pool_emb = np.asarray(pool_emb)
    check_emb(pool_emb, "pool_emb", non_empty=True)
    target_emb = np.asarray(target_emb)
    check_emb(target_emb, "target_emb", non_empty=True)
    if pool_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(f"pool_emb has d={pool_emb.shape[1]} but target_emb has d={target_emb.shape[1]}")
    if sample_size < 2 or target_sample_size < 1:
        raise ValueError(f"sample_size must be >= 2 and target_sample_size >= 1, got {sample_size}, "
                         f"{target_sample_size}")
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and >= 0 (0 = exact OT), got {eps}")
    rng = np.random.default_rng(seed)
    n = pool_emb.shape[0]
    samp_idx = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    pool_sample = np.asarray(pool_emb[samp_idx], dtype=np.float64)
    tgt = np.asarray(target_emb, dtype=np.float64)
    if tgt.shape[0] > target_sample_size:
        tgt = tgt[np.sort(rng.choice(tgt.shape[0], size=target_sample_size, replace=False))]
    wh = None
    if whiten:
        wh = fit_whitening(pool_sample, method=whitening_method, ridge=ridge)
        pool_sample = wh.apply(pool_sample).astype(np.float64)
        tgt = wh.apply(tgt).astype(np.float64)
    if normalize:
        pool_sample = unit_rows(pool_sample).astype(np.float64)
        tgt = unit_rows(tgt).astype(np.float64)
    t1 = time.perf_counter()
    _, g, info = target_potential(pool_sample, tgt, eps=eps, num_iter=num_iter)
    t2 = time.perf_counter()

    scores = np.empty(n, dtype=np.float32)
    rows = max(1, chunk)
    for s in range(0, n, rows):
        block = np.asarray(pool_emb[s:s + rows])
        if wh is not None:
            block = wh.apply(block, chunk=rows)
        if normalize:
            block = unit_rows(block)
        f = c_transform(block, tgt, g, eps=eps, cost_scale=info["cost_scale"], chunk=rows, device=device)
        scores[s:s + rows] = -f
    t3 = time.perf_counter()
    info.update({
        "method": "TAROT/LAVA OT dual potential (c-transform of the target potential)",
        "orientation": "higher = more useful (score = -f, f = pool-side dual potential)",
        "whiten": whitening_method if whiten else None, "ridge": ridge if whiten else None, "normalize": normalize,
        "sample_size": int(samp_idx.size), "n_target_used": int(tgt.shape[0]), "n_pool": int(n),
        "chunk": rows, "seed": seed,
        "seconds": {"fit": t1 - t0, "potentials": t2 - t1, "stream": t3 - t2, "total": t3 - t0},
    })
    return OTScores(score=scores, info=info, whitening=wh, target_potential=g, target_points=tgt.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# TAROT mode 2: OT-distance minimisation (OTM) over target folds; the selection ratio is an output
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RatioEstimate:
    """TAROT's OTM result: the union of the per-fold selections, its ratio, and the distance curves.

    ``k_grid[i]`` neighbours per selecting target row give, in fold j, a selection of ``sizes[i][j]`` pool rows at OT
    distance ``distance_per_fold[i][j]`` from the fold's reference rows. ``ratios[i]`` / ``distance[i]`` are the means
    over folds (the curve written to run.json). ``selected`` = union over folds of each fold's chosen selection;
    ``ratio = len(selected) / N``.
    """

    ratio: float
    selected: np.ndarray  # int64 pool row indices, sorted
    k_grid: list[int]
    ratios: list[float]  # mean (over folds) selected fraction per k
    distance: list[float]  # mean (over folds) OT distance per k
    distance_per_fold: list[list[float]]  # [k][fold]
    sizes: list[list[int]]  # [k][fold]
    fold_choice: list[int]  # chosen k per fold
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Number of pool rows in the OTM selection (= ceil-free count of ``selected``)."""
        return int(self.selected.size)




def _topk_per_target(pool_emb: np.ndarray, prep: Any, targets_u: np.ndarray, k_max: int, *, chunk: int,
                     device: str) -> tuple[np.ndarray, np.ndarray]:
    """For every target row, the ``k_max`` most cosine-similar pool rows (sorted, best first), streamed over the pool
    in chunks: memory ``(chunk + k_max) x |T|``, never ``N x |T|``. Returns (sims [k_max, |T|], idx [k_max, |T|])."""
    import torch

    dev = select_device(device)
    t = torch.as_tensor(targets_u, device=dev)
    best_v = best_i = None
    n = pool_emb.shape[0]
    with torch.no_grad():
        for s in range(0, n, chunk):
            xb = torch.as_tensor(prep(np.asarray(pool_emb[s:s + chunk])), device=dev)
            sim = xb @ t.T  # [c, |T|]
            ids = torch.arange(s, s + xb.shape[0], device=dev)[:, None].expand_as(sim)
            if best_v is not None:
                sim = torch.cat([best_v, sim])
                ids = torch.cat([best_i, ids])
            kk = min(k_max, sim.shape[0])
            best_v, pos = torch.topk(sim, kk, dim=0, largest=True, sorted=True)
            best_i = torch.gather(ids, 0, pos)
    return best_v.cpu().numpy(), best_i.cpu().numpy().astype(np.int64)


def _ot_distance(sel_u: np.ndarray, ref_u: np.ndarray, cost: str) -> float:
    """Exact OT (``ot.emd2``) between uniform measures; cost ``euclidean`` (TAROT: sqrt(2 - 2 cos) on the sphere) or
    ``sqeuclidean``."""
    import ot

    c = _sq_dists(sel_u, ref_u)
    if cost == "euclidean":
        c = np.sqrt(c)
    a = np.full(sel_u.shape[0], 1.0 / sel_u.shape[0])
    b = np.full(ref_u.shape[0], 1.0 / ref_u.shape[0])
    return float(ot.emd2(a, b, c, numItermax=1_000_000))


def estimate_selection_ratio(pool_emb: np.ndarray, target_emb: np.ndarray, *, k_folds: int = 5,
                             n_grid: int = 40, max_ratio: float = 1.0, whiten: bool = True,
                             whitening_method: Literal["zca", "cholesky"] = "cholesky", ridge: float = 1e-3,
                             sample_size: int = 5000, subsample: int = 3000, cost: str = "euclidean",
                             stop: Literal["min", "first_increase"] = "min", seed: int = 0, chunk: int = 65536,
                             device: str = "auto") -> RatioEstimate:
    """TAROT's OT-distance minimisation (OTM): how much of the pool to select, with the selection itself.

    Follows vita-epfl/TAROT (``DataSelector.select_data``, method ``otm``):

    1. Features: whitening fitted on a pool sample **together with the target** (TAROT fits one Cholesky whitening on
       candidates + targets), then rows scaled to unit norm; similarity = cosine, OT cost = ||u - v|| =
       sqrt(2 - 2 cos) (``cost="euclidean"``, TAROT's ``cosine_L2``).
    2. K-fold over the target (shuffled). In fold j the *held-out* fold selects and the other k-1 folds are the
       reference: for k neighbours per selecting target row, the selection is the union of each selecting row's k
       most similar pool rows (similarity > 0, as TAROT), and its OT distance (exact ``ot.emd2``; TAROT uses
       geomloss Sinkhorn at blur 0.01, i.e. nearly exact) to the reference rows is measured.
    3. k runs over a geometric grid (``n_grid`` values from 1 to the largest useful k; TAROT walks k = 1, 2, 3, ...);
       each fold keeps the selection at the k of least distance (``stop="min"``) or, as TAROT, at the last k before
       the distance first rises (``stop="first_increase"``).
    4. The result is the union of the fold selections; ``ratio = |union| / N`` is an output, not an input.

    Why this and not "top-r by the OT score vs a held-out fold": in high dimension a *concentrated* set (near the
    target's mode) is closer in empirical OT to a small held-out fold than a sample of the target's own
    distribution (E||x - mean||^2 = tr C vs E||x - x'||^2 = 2 tr C), so ranking by a global score and minimising over r
    picks a tiny r. Growing per-target neighbourhoods keep the selection spread like the target, so the distance
    falls while the neighbourhoods stay in the target's domain and rises once they spill out of it.

    The similarity matrix is never ``N x |T|``: the top-k neighbours of every target row are kept while streaming the
    pool (``k_max x |T|`` with ``k_max <= min(N, 2^25 / |T|, ceil(max_ratio N))``). Each distance uses at most
    ``subsample`` rows of the selection (seeded uniform draw). Costs ~ n_grid x k_folds exact OT solves.
    """
    pool_emb = np.asarray(pool_emb)
    check_emb(pool_emb, "pool_emb", non_empty=True)
    target_emb = np.asarray(target_emb)
    check_emb(target_emb, "target_emb", non_empty=True)
    n, n_t = pool_emb.shape[0], target_emb.shape[0]
    if pool_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(f"pool_emb has d={pool_emb.shape[1]} but target_emb has d={target_emb.shape[1]}")
    if not 2 <= k_folds <= n_t:
        raise ValueError(f"k_folds must be in [2, len(target_emb)={n_t}], got {k_folds}")
    if not 0.0 < max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
    if n_grid < 2 or subsample < 2 or chunk < 1:
        raise ValueError(f"n_grid and subsample must be >= 2 and chunk >= 1, got {n_grid}, {subsample}, {chunk}")
    if cost not in ("euclidean", "sqeuclidean"):
        raise ValueError(f"cost must be 'euclidean' or 'sqeuclidean', got {cost!r}")
    if stop not in ("min", "first_increase"):
        raise ValueError(f"stop must be 'min' or 'first_increase', got {stop!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    wh = None
    if whiten:
        samp = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
        joint = np.concatenate([np.asarray(pool_emb[samp], dtype=np.float64), np.asarray(target_emb, np.float64)])
        wh = fit_whitening(joint, method=whitening_method, ridge=ridge)

    def prep(x: np.ndarray) -> np.ndarray:
        return unit_rows(wh.apply(x) if wh is not None else np.asarray(x, dtype=np.float32))

    target_u = prep(target_emb)
    k_max = max(1, min(n, _MAX_BLOCK_ELEMS // n_t, math.ceil(max_ratio * n)))
    sims, nbr = _topk_per_target(pool_emb, prep, target_u, k_max, chunk=chunk, device=device)
    k_max = sims.shape[0]
    grid = sorted({int(round(v)) for v in np.geomspace(1, k_max, n_grid)})
    folds = np.array_split(rng.permutation(n_t), k_folds)
    dist = np.full((len(grid), k_folds), np.nan)
    sizes = np.zeros((len(grid), k_folds), dtype=np.int64)
    chosen: list[np.ndarray] = []
    fold_choice: list[int] = []
    for j, sel_rows in enumerate(folds):
        ref = target_u[np.setdiff1d(np.arange(n_t), sel_rows)]
        best_d, best_sel, best_k = math.inf, np.zeros(0, np.int64), 0
        for i, k in enumerate(grid):
            block_i, block_v = nbr[:k, sel_rows], sims[:k, sel_rows]
            sel = np.unique(block_i[block_v > 0])
            sizes[i, j] = sel.size
            if sel.size == 0:
                continue
            take = sel if sel.size <= subsample else np.sort(rng.choice(sel, size=subsample, replace=False))
            dist[i, j] = _ot_distance(prep(np.asarray(pool_emb[take])), ref, cost)
            if dist[i, j] < best_d:
                best_d, best_sel, best_k = dist[i, j], sel, k
            elif stop == "first_increase":
                break
        chosen.append(best_sel)
        fold_choice.append(best_k)
    selected = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    with np.errstate(invalid="ignore"):
        mean_d = np.nanmean(np.where(np.isnan(dist).all(1, keepdims=True), np.inf, dist), axis=1)
    info = {"k_folds": k_folds, "k_max": int(k_max), "subsample": subsample, "cost": cost, "stop": stop,
            "distance": "exact ot.emd2 between uniform measures, reference = the other k-1 folds",
            "whiten": whitening_method if whiten else None, "whitening_fit": "pool sample + target",
            "fold_ratios": [float(c.size / n) for c in chosen], "n_selected": int(selected.size),
            "seconds": time.perf_counter() - t0}
    return RatioEstimate(ratio=float(selected.size / n), selected=selected, k_grid=grid,
                         ratios=(sizes.mean(1) / n).tolist(), distance=mean_d.tolist(),
                         distance_per_fold=dist.tolist(), sizes=sizes.tolist(), fold_choice=fold_choice, info=info)


# ----------------------------------------------------------------------------------------------------------------------
# Gradient features (TAROT / LESS route): projected per-sample gradients of a proxy linear head
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ProxyHead:
    """A multinomial logistic-regression head on standardised embeddings: p = softmax(W [z, 1]), z = (h - mu) / sd."""

    mu: np.ndarray  # [d] float32
    sd: np.ndarray  # [d] float32
    weight: np.ndarray  # [C, d + 1] float32 (last column = bias)
    classes: np.ndarray  # [C] the label values, in code order
    info: dict[str, Any] = field(default_factory=dict)

    def inputs(self, h: np.ndarray) -> np.ndarray:
        z = (np.asarray(h, dtype=np.float32) - self.mu) / self.sd
        return np.concatenate([z, np.ones((z.shape[0], 1), np.float32)], axis=1)

    def proba(self, h: np.ndarray) -> np.ndarray:
        logits = self.inputs(h) @ self.weight.T
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)


def fit_proxy_head(emb: np.ndarray, labels: np.ndarray, *, sample_size: int = 50_000, epochs: int = 10,
                   lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 1024, seed: int = 0) -> ProxyHead:
    """Trains the proxy linear softmax head (Adam, seeded) on a seeded sample of (embedding, label) rows."""
    import torch

    emb = np.asarray(emb)
    check_emb(emb, "emb", non_empty=True)
    codes, classes = encode_labels(labels, emb.shape[0])
    if classes.size < 2:
        raise ValueError("the proxy head needs at least two label values")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(emb.shape[0], size=min(sample_size, emb.shape[0]), replace=False))
    h = np.asarray(emb[idx], dtype=np.float32)
    mu, sd = h.mean(0), h.std(0) + 1e-6
    head = ProxyHead(mu=mu, sd=sd, weight=np.zeros((classes.size, h.shape[1] + 1), np.float32), classes=classes)
    x = torch.from_numpy(head.inputs(h))
    y = torch.from_numpy(codes[idx].astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(classes.size, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for b in range(0, x.shape[0], batch_size):
            i = perm[b:b + batch_size]
            loss = torch.nn.functional.cross_entropy(x[i] @ w.T, y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float(((x @ w.T).argmax(1) == y).float().mean())
    head.weight = w.detach().numpy().astype(np.float32)
    head.info = {"n_train": int(idx.size), "epochs": epochs, "train_acc": acc, "n_classes": int(classes.size)}
    return head


def gradient_features(emb: np.ndarray, head: ProxyHead, labels: np.ndarray | None = None, *, grad_dim: int = 256,
                      seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """Per-sample gradients of the head's cross-entropy w.r.t. its weights, JL-projected to ``grad_dim``, streamed.

    For a linear softmax head the gradient is closed-form: dL/dW = (p - y) ⊗ [z, 1] (C x (d+1)). It is projected
    with a seeded Rademacher matrix R / sqrt(grad_dim) (Johnson-Lindenstrauss), chunk by chunk, never materialising
    more than ``chunk x C(d+1)``. ``labels=None`` uses the head's predicted label (for target rows without labels,
    the usual choice of gradient-based selectors when the target is unlabelled); labels outside the head's classes
    raise. Returns float32 [n, grad_dim].
    """
    emb = np.asarray(emb)
    check_emb(emb, "emb", non_empty=True)
    if grad_dim < 1:
        raise ValueError(f"grad_dim must be >= 1, got {grad_dim}")
    n_cls, d1 = head.weight.shape
    if emb.shape[1] != d1 - 1:
        raise ValueError(f"emb has d={emb.shape[1]} but the head expects {d1 - 1}")
    codes = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (emb.shape[0],):
            raise ValueError(f"labels must have shape ({emb.shape[0]},), got {labels.shape}")
        pos = np.searchsorted(head.classes, labels)
        pos = np.clip(pos, 0, n_cls - 1)
        if not np.all(head.classes[pos] == labels):
            raise ValueError("labels contain values the proxy head was not trained on")
        codes = pos
    rng = np.random.default_rng(seed)
    proj = (rng.integers(0, 2, size=(n_cls * d1, grad_dim), dtype=np.int8) * 2 - 1).astype(np.float32)
    proj /= math.sqrt(grad_dim)
    rows = max(1, min(chunk, _MAX_BLOCK_ELEMS // (n_cls * d1)))
    out = np.empty((emb.shape[0], grad_dim), dtype=np.float32)
    for s in range(0, emb.shape[0], rows):
        h = np.asarray(emb[s:s + rows])
        z1 = head.inputs(h)
        p = head.proba(h)
        y = p.argmax(1) if codes is None else codes[s:s + rows]
        p[np.arange(p.shape[0]), y] -= 1.0  # p - onehot(y)
        g = (p[:, :, None] * z1[:, None, :]).reshape(p.shape[0], -1)  # [rows, C(d+1)]
        out[s:s + rows] = g @ proj
    return out


# ---- the curate step --------------------------------------------------------------------------------------------------


@step("ot_target", reason="ot", needs=("targets",), exactly_one=(("keep_fraction", "estimate_ratio"),),
      scores=(Score("score_ot", higher="closer to the target domain"),),
      orientation="score_ot: minus the c-transform of the target's OT potential; higher = closer to the target domain")
def step_ot_target(
    ctx: ScoringContext,
    *,
    target: SourceMapping,
    keep_fraction: Fraction | None = None,
    estimate_ratio: bool = False,
    eps: NonNegative = 0.05,
    whiten: bool = True,
    features: Literal["embedding", "gradient"] = "embedding",
    grad_dim: Count = 256,
    k_folds: Annotated[int, Field(ge=2)] = 5,
) -> StepOutput:
    """Targeted selection by optimal transport (TAROT, vita-epfl; per-sample values as in LAVA / GOT-D).

    Whitened features; entropic OT between a pool sample and the embedded `target` set (POT) gives the target
    potential g; every alive row's score is minus its c-transform (streamed in chunks, never N×|T|), so
    score_ot: higher = closer to the target domain. Keeps the top `keep_fraction` of all rows, or with
    `estimate_ratio` TAROT's OT-distance minimisation (k_folds over the target, per-target neighbourhoods grown until
    the OT distance to the other folds stops falling) estimates the ratio, and the top ratio·N rows by score_ot are
    kept (ratio, OTM union size and the distance curve go to run.json).
    `features`: "embedding" (default) or "gradient" — projected per-sample gradients (`grad_dim`, seeded Rademacher
    JL) of a proxy linear softmax head trained on the alive rows' embeddings and labels (needs labels); target rows
    carry no labels, so their gradients use the head's predicted label.
    """
    target_emb = ctx.targets.get(target_key(target))
    if target_emb is None:
        raise ValueError(f"target {target} was not embedded before scoring")
    rows = np.flatnonzero(ctx.alive)
    pool_x, target_x = ctx.emb[rows], target_emb
    info: dict[str, Any] = {"eps": eps, "whiten": whiten, "target_rows": len(target_emb), "features": features}
    if features == "gradient":
        labels = require_labels(ctx, "ot_target with features: gradient")
        head = fit_proxy_head(pool_x, labels[rows], seed=ctx.seed)
        pool_x = gradient_features(pool_x, head, labels[rows], grad_dim=grad_dim, seed=ctx.seed)
        target_x = gradient_features(target_emb, head, None, grad_dim=grad_dim, seed=ctx.seed)
        info.update(grad_dim=grad_dim, proxy_head=head.info, target_labels="predicted by the proxy head")
    # Gradient rows are scaled to unit norm after whitening (TAROT): their length mostly says how confidently the head
    # fits a row, so without it every well-fitted row of any domain sits next to the target.
    result = ot_scores(pool_x, target_x, eps=eps, whiten=whiten, seed=ctx.seed, device=ctx.device,
                       normalize=features == "gradient")
    n = len(ctx.uids)
    scores = scatter(n, rows, result.score)
    info.update(result.info)
    if estimate_ratio:
        estimate = estimate_selection_ratio(pool_x, target_x, k_folds=k_folds, whiten=whiten, seed=ctx.seed,
                                            device=ctx.device)
        info.update(estimated_ratio=estimate.ratio, otm_selected=estimate.k, otm=estimate.info,
                    ratio_curve={"neighbours_per_target": estimate.k_grid, "mean_selected_fraction": estimate.ratios,
                                 "mean_ot_distance": estimate.distance})
        keep_fraction = max(1, int(np.ceil(estimate.ratio * len(rows)))) / ctx.n_scorable
    drop, note = select_among_alive(ctx, scores, keep_fraction, rule="hard", class_balanced=False)
    return StepOutput(scores={"score_ot": scores}, drop=drop, info={**info, **note})
