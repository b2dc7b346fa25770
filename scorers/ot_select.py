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
fixed-budget selection is the top-k by score. ``estimate_selection_ratio`` implements TAROT's second mode.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
    "Whitening",
    "fit_whitening",
    "OTScores",
    "target_potential",
    "c_transform",
    "ot_scores",
    "RatioEstimate",
    "estimate_selection_ratio",
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


def _resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    dev = _resolve_device(device)
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


def _check_emb(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n, d], got shape {x.shape}")
    return x


def ot_scores(pool_emb: np.ndarray, target_emb: np.ndarray, *, eps: float = 0.05, whiten: bool = True,
              whitening_method: Literal["zca", "cholesky"] = "zca", ridge: float = 1e-3, sample_size: int = 5000,
              target_sample_size: int = 5000, chunk: int = 65536, seed: int = 0, device: str = "auto",
              num_iter: int = 2000) -> OTScores:
    """TAROT/LAVA per-sample OT scores of every pool row toward ``target_emb``; **higher = more useful**.

    1. (``whiten``) fit a whitening map on a seeded sample of ``sample_size`` pool rows; apply it to pool and target.
    2. Solve OT (entropic at ``eps`` relative to the mean cost, exact when ``eps == 0``) between that pool sample and
       the target (subsampled to ``target_sample_size`` rows if larger) with POT; keep the target potential g.
    3. Stream the c-transform of g over all pool rows in chunks of ``chunk`` rows: score = -f(x).
    The pool may be a memory-mapped array; only ``chunk`` rows are whitened and scored at a time.
    """
    t0 = time.perf_counter()
    pool_emb = _check_emb("pool_emb", pool_emb)
    target_emb = _check_emb("target_emb", target_emb)
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
    t1 = time.perf_counter()
    _, g, info = target_potential(pool_sample, tgt, eps=eps, num_iter=num_iter)
    t2 = time.perf_counter()

    scores = np.empty(n, dtype=np.float32)
    rows = max(1, chunk)
    for s in range(0, n, rows):
        block = np.asarray(pool_emb[s:s + rows])
        if wh is not None:
            block = wh.apply(block, chunk=rows)
        f = c_transform(block, tgt, g, eps=eps, cost_scale=info["cost_scale"], chunk=rows, device=device)
        scores[s:s + rows] = -f
    t3 = time.perf_counter()
    info.update({
        "method": "TAROT/LAVA OT dual potential (c-transform of the target potential)",
        "orientation": "higher = more useful (score = -f, f = pool-side dual potential)",
        "whiten": whitening_method if whiten else None, "ridge": ridge if whiten else None,
        "sample_size": int(samp_idx.size), "n_target_used": int(tgt.shape[0]), "n_pool": int(n),
        "chunk": rows, "seed": seed,
        "seconds": {"fit": t1 - t0, "potentials": t2 - t1, "stream": t3 - t2, "total": t3 - t0},
    })
    return OTScores(score=scores, info=info, whitening=wh, target_potential=g, target_points=tgt.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# TAROT mode 2: choose how much to select by OT-distance minimisation over target folds
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RatioEstimate:
    """The selection ratio minimising the mean OT distance to held-out target folds, and the whole curve."""

    ratio: float
    ratios: list[float]
    distance: list[float]  # mean over folds, per ratio
    distance_per_fold: list[list[float]]  # [ratio][fold]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Number of pool rows to keep at the estimated ratio."""
        return int(self.info.get("k", 0))


DEFAULT_RATIOS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def estimate_selection_ratio(pool_emb: np.ndarray, target_emb: np.ndarray, scores: np.ndarray | None = None, *,
                             ratios: Sequence[float] = DEFAULT_RATIOS, k_folds: int = 5, eps: float = 0.05,
                             whiten: bool = True, whitening: Whitening | None = None, ridge: float = 1e-3,
                             subsample: int = 1000, sample_size: int = 5000, distance_eps: float = 0.0,
                             seed: int = 0, device: str = "auto") -> RatioEstimate:
    """TAROT's OT-distance minimisation: for each ratio r keep the top ceil(r*N) pool rows by score and measure the OT
    distance from (a seeded subsample of) them to each held-out target fold; return the r of least mean distance.

    ``scores=None`` (the honest k-fold): each fold's selection is ranked by ``ot_scores`` computed against the *other*
    folds only, so a ratio is never judged on the target rows that chose it. Given ``scores``, they rank every fold.
    The distance is squared-Euclidean OT on whitened features (``ot.emd2``, exact, when ``distance_eps == 0``; else
    ``ot.sinkhorn2`` at that relative eps), between uniform measures; every ratio uses the same number of rows
    ``min(subsample, ceil(r*N))``, so finite-sample bias does not favour one ratio.

    Caveat (measured): OT between empirical measures is biased toward *concentrated* selections when the dimension
    is high and the held-out folds are small (25 rows in 8-d: the minimum sits at a third of the true share); with
    ~50 rows per fold in <= 4-d it lands on the share. Reduce the features (e.g. PCA) or give more target rows.
    """
    import ot

    pool_emb = _check_emb("pool_emb", pool_emb)
    target_emb = _check_emb("target_emb", target_emb)
    n, n_t = pool_emb.shape[0], target_emb.shape[0]
    if pool_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(f"pool_emb has d={pool_emb.shape[1]} but target_emb has d={target_emb.shape[1]}")
    rs = [float(r) for r in ratios]
    if not rs or any(not (0.0 < r <= 1.0) for r in rs):
        raise ValueError(f"ratios must be a non-empty list of values in (0, 1], got {list(ratios)}")
    rs = sorted(set(rs))
    if not 2 <= k_folds <= n_t:
        raise ValueError(f"k_folds must be in [2, len(target_emb)={n_t}], got {k_folds}")
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},), got {scores.shape}")
    if subsample < 2:
        raise ValueError(f"subsample must be >= 2, got {subsample}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if whiten and whitening is None:
        samp = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
        whitening = fit_whitening(np.asarray(pool_emb[samp], dtype=np.float64), ridge=ridge)
    wh = whitening if whiten else None

    def prep(x: np.ndarray) -> np.ndarray:
        return wh.apply(x) if wh is not None else np.asarray(x, dtype=np.float32)

    target_w = prep(target_emb)
    folds = np.array_split(rng.permutation(n_t), k_folds)
    # Every distance shares one cost scale (mean cost pool-sample -> target) so the curve's units are comparable.
    ref_rows = np.sort(rng.choice(n, size=min(subsample, n), replace=False))
    scale = float(_sq_dists(prep(np.asarray(pool_emb[ref_rows])), target_w).mean())
    dist = np.zeros((len(rs), k_folds))
    for k, held in enumerate(folds):
        if scores is None:
            train = np.setdiff1d(np.arange(n_t), held)
            fold_scores = ot_scores(pool_emb, target_emb[train], eps=eps, whiten=whiten, ridge=ridge,
                                    sample_size=sample_size, seed=seed + k, device=device).score
        else:
            fold_scores = scores
        order = np.argsort(-fold_scores, kind="stable")
        held_w = target_w[held]
        b = np.full(held.size, 1.0 / held.size)
        for i, r in enumerate(rs):
            top = order[:max(1, math.ceil(r * n))]
            take = np.sort(rng.choice(top, size=min(subsample, top.size), replace=False))
            sel_w = prep(np.asarray(pool_emb[take]))
            cost = _sq_dists(sel_w, held_w) / scale
            a = np.full(take.size, 1.0 / take.size)
            if distance_eps > 0:
                dist[i, k] = float(ot.sinkhorn2(a, b, cost, distance_eps, method="sinkhorn_log"))
            else:
                dist[i, k] = float(ot.emd2(a, b, cost))
    mean = dist.mean(1)
    best = int(np.argmin(mean))
    info = {"k": int(math.ceil(rs[best] * n)), "k_folds": k_folds, "subsample": subsample,
            "distance": "exact ot.emd2" if distance_eps == 0 else f"ot.sinkhorn2 eps={distance_eps}",
            "cost_scale": scale, "per_fold_scores": scores is None, "seconds": time.perf_counter() - t0}
    return RatioEstimate(ratio=rs[best], ratios=rs, distance=mean.tolist(), distance_per_fold=dist.tolist(),
                         info=info)
