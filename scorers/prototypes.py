"""Self-supervised prototype score (Sorscher et al. 2022), plus the centroid geometry shared by the concept-cluster scorers.

Method: "Beyond neural scaling laws: beating power law scaling via data pruning" (Sorscher, Geirhos, Shekhar,
Ganguli, Morcos; NeurIPS 2022). Cluster the self-supervised embeddings with k-means; a sample's difficulty is its
distance to the nearest centroid (prototype). Keep the hard (far) samples when data is abundant, the easy (near)
ones when it is scarce.

This module also holds the helpers that ``scorers.semdedup`` and ``scorers.dbp`` reuse: picking a torch device with a
CPU fallback, a context that forces true fp32 matrix products, and the (spherical) distance of each row to its
assigned centroid.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np

from scorers.arrays import check_emb
from scorers.device import select_device
from scorers.lazy import lazy_module
from scorers.step import Fraction, Score, ScoringContext, StepOutput, select_among_alive, step

# Imported on first use, not when config validation imports this module (scorers/lazy.py).
torch = lazy_module("torch")

__all__ = [
    "distance_to_centroid",
    "fp32_matmul",
    "nearest_centroid",
    "prototype_scores",
]

# Rows per chunk when streaming over a (possibly memory-mapped, float16) embedding matrix: bounds the float32
# temporaries to a few tens of MB whatever the dataset size.
_CHUNK_ROWS = 16384


@contextlib.contextmanager
def fp32_matmul() -> Iterator[None]:
    """Force IEEE fp32 matrix products for the duration (TF32 off on GPU, no TF32/bf16 via oneDNN on CPU).

    TF32 keeps 10 mantissa bits (relative error ~1e-3), which cannot resolve SemDeDup thresholds of eps ~ 1e-3.
    On torch with per-backend ``fp32_precision`` settings only those are touched (reading the global precision raises
    once a caller has mixed the legacy and new APIs); older torch uses the legacy flags. Restored on exit.
    """
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if backends:
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
        return
    prev_precision = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32




def _unit_rows64(x: np.ndarray, name: str) -> np.ndarray:
    """float64 copy with unit-norm rows; zero or non-finite rows are an error."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} zero or non-finite rows (first at {int(np.flatnonzero(bad)[0])})")
    return x64 / norms[:, None]


def unit_centroids(centroids: np.ndarray, dim: int) -> np.ndarray:
    """Validate centroids (k x dim) and return them unit-normalised in float64 (faiss spherical k-means already is)."""
    check_emb(centroids, "centroids")
    if centroids.shape[1] != dim:
        raise ValueError(f"centroids have dimension {centroids.shape[1]}, embeddings have {dim}")
    if centroids.shape[0] == 0:
        raise ValueError("centroids is empty")
    return _unit_rows64(centroids, "centroids")


def check_cluster_ids(cluster_ids: np.ndarray, n_rows: int, n_clusters: int) -> np.ndarray:
    """Validate per-row cluster ids (integers in [0, n_clusters)) and return them as int64."""
    ids = np.asarray(cluster_ids)
    if ids.shape != (n_rows,):
        raise ValueError(f"cluster_ids must have shape ({n_rows},), got {ids.shape}")
    if n_rows and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"cluster_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n_rows and (ids.min() < 0 or ids.max() >= n_clusters):
        raise ValueError(f"cluster_ids must lie in [0, {n_clusters}), got range [{ids.min()}, {ids.max()}]")
    return ids


def distance_to_centroid(emb: np.ndarray, cluster_ids: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Spherical distance of every row to its assigned centroid: ``1 - x·mu_c`` with x and mu_c unit-normalised.

    Float32, chunk by chunk (works on a float16 memmap without loading it whole). The row-wise dot products use
    ``np.einsum`` (no BLAS), whose per-row result does not depend on where the row sits or on its memory alignment:
    identical rows give bit-identical distances, which the uid tie-breaks rely on. Returns float32 (n,), in [0, 2].
    """
    check_emb(emb)
    n, d = emb.shape
    mu = unit_centroids(centroids, d).astype(np.float32)
    ids = check_cluster_ids(cluster_ids, n, mu.shape[0])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, _CHUNK_ROWS):
        x = np.asarray(emb[s:s + _CHUNK_ROWS], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            raise ValueError(f"emb has {int(bad.sum())} zero or non-finite rows (first at {s + int(np.flatnonzero(bad)[0])})")
        out[s:s + len(x)] = 1.0 - np.einsum("ij,ij->i", x, mu[ids[s:s + _CHUNK_ROWS]]) / norms
    return out


def nearest_centroid(
    emb: np.ndarray,
    centroids: np.ndarray,
    *,
    batch_size: int = 65536,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and cosine similarity to, the nearest centroid of every row (ties: the lowest centroid index).

    Rows and centroids are unit-normalised; products in fp32 on ``device`` (TF32 off), ``batch_size`` rows at a time.
    Returns (int64 indices, float32 similarities), shape (n,) each.
    """
    check_emb(emb)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, d = emb.shape
    dev = select_device(device)
    mu = torch.from_numpy(unit_centroids(centroids, d).astype(np.float32)).to(dev)
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    with fp32_matmul():
        for s in range(0, n, batch_size):
            x = torch.from_numpy(np.asarray(emb[s:s + batch_size], dtype=np.float32)).to(dev)
            x = x / _row_norms(x, s)
            best, arg = (x @ mu.T).max(dim=1)
            sim[s:s + len(x)] = best.cpu().numpy()
            idx[s:s + len(x)] = arg.cpu().numpy()
    return idx, sim


def _row_norms(x: torch.Tensor, offset: int) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0]) + offset
        raise ValueError(f"emb has {int(bad.sum())} zero or non-finite rows (first at {first})")
    return norms


def prototype_scores(
    emb: np.ndarray,
    centroids: np.ndarray,
    *,
    keep: Literal["hard", "easy"] = "hard",
    batch_size: int = 65536,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Self-supervised prototype score (Sorscher et al. 2022): cosine distance to the nearest centroid.

    ``d = 1 - max_c x·mu_c`` (unit rows and centroids, fp32). Orientation: higher = more worth keeping, always.
    With ``keep="hard"`` (abundant data) the score is ``d`` (far from every prototype = hard = keep);
    with ``keep="easy"`` (scarce data) it is ``-d``. Returns float32, shape (n,).
    Use :func:`nearest_centroid` for the prototype each row is measured against.
    """
    if keep not in ("hard", "easy"):
        raise ValueError(f"keep must be 'hard' or 'easy', got {keep!r}")
    _, sim = nearest_centroid(emb, centroids, batch_size=batch_size, device=device)
    dist = (1.0 - sim).astype(np.float32)
    return dist if keep == "hard" else -dist


# ---- the curate step --------------------------------------------------------------------------------------------------


@step("prototype", reason="prototype", scores=(Score("score_prototype", higher="harder", hardness=1, nullable=False),),
      orientation="score_prototype: cosine distance to the nearest centroid; higher = harder (kept first with keep: hard)")
def step_prototype(ctx: ScoringContext, *, keep: Literal["hard", "easy"] = "hard", keep_fraction: Fraction | None = None) -> StepOutput:
    """Prototype score (Sorscher et al. 2022): cosine distance to the nearest k-means centroid.

    score_prototype is the distance itself (higher = farther from its prototype = harder). With keep_fraction,
    keeps the farthest (keep: hard) or nearest (keep: easy) rows, class-balanced when labels exist.
    """
    distance = prototype_scores(ctx.emb, ctx.kmeans.centroids, keep="hard", device=ctx.device)
    out = StepOutput(scores={"score_prototype": distance})
    if keep_fraction is not None:
        out.drop, out.info = select_among_alive(ctx, distance, keep_fraction, rule=keep)
    return out
