"""The score stage: the configured steps run over the store's ok rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.config import CurateConfig
from pipeline.fanout import FanOut
from pipeline.index import KMeansResult
from pipeline.ok_rows import OkRows
from pipeline.steps import ScoringContext, run_steps
from pipeline.store import EmbeddingStore


def score(
    cfg: CurateConfig,
    store: EmbeddingStore,
    emb: Any,
    rows: OkRows,
    kmeans: KMeansResult,
    targets: dict[str, np.ndarray] | None = None,
    fan_out: FanOut | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Runs the configured steps over the ok rows; returns run_steps' per-row columns and one note per step."""
    needs_sha1 = any(s.scorer == "exact_dup" for s in cfg.steps)
    ctx = ScoringContext(
        emb=emb,
        uids=rows.uid_rank,
        labels=rows.labels,
        sha1=store.all_meta(pl.col("status") == "ok", ["sha1"])["sha1"].to_numpy().astype(object) if needs_sha1 else None,
        kmeans=kmeans,
        alive=np.ones(len(rows), dtype=bool),
        n_scorable=len(rows),
        seed=cfg.seed,
        device=cfg.embed.device,
        targets=targets or {},
        fan_out=fan_out,
        cluster_batches=cfg.runner.cluster_batches or 4 * cfg.runner.workers,
        cache_dir=store.root / "index" / f"auto-{store.fingerprint()}",
    )
    return run_steps(ctx, [(s.scorer, s.knobs()) for s in cfg.steps])
