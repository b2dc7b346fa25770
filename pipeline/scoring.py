"""The score stage: the configured steps run over the store's ok rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from pipeline.config import CurateConfig
from pipeline.fanout import FanOut
from pipeline.index import KMeansResult
from pipeline.ok_rows import OkRows
from pipeline.steps import EvalSet, ScoringContext, run_steps
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
    from pipeline.fill_store import worker_embedder
    from pipeline.text_embed import cached_text_embeddings

    needs_sha1 = any(s.scorer == "exact_dup" for s in cfg.steps)
    targets = targets or {}

    def meta(names: list[str]) -> dict[str, np.ndarray]:
        frame = store.all_meta(pl.col("status") == "ok", names)  # shard order = the rows' order (open_rows)
        return {c: frame[c].to_numpy() for c in names}

    def text_encoder(texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        # the store's embedder is rebuilt only on a cache miss; the text cache sits beside the store
        return cached_text_embeddings(store.root / "text", store.info().embedder, texts,
                                      lambda: worker_embedder(cfg, store.root), batch_size=batch_size)

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
        targets={k: v for k, v in targets.items() if not isinstance(v, EvalSet)},
        eval_sets={k.removeprefix("eval:"): v for k, v in targets.items() if isinstance(v, EvalSet)},
        meta=meta,
        text_encoder=text_encoder,
        embedder=store.info().embedder,
        fan_out=fan_out,
        cluster_batches=cfg.runner.cluster_batches or 4 * cfg.runner.workers,
        cache_dir=store.root / "index" / f"auto-{store.fingerprint()}",
    )
    return run_steps(ctx, [(s.scorer, s.knobs()) for s in cfg.steps])
