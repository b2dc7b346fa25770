"""The curate stages as plain functions: ingest → embed → index → score → manifest.

flows/curate.py wraps each in a Prefect task; nothing here imports Prefect, so the stages can be
called and tested on their own.
"""
from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path
from pipeline.config import CurateConfig
from pipeline.index import KMeansParams, KMeansResult, artefact_key, load_kmeans, save_kmeans, spherical_kmeans
from pipeline.steps import STEPS, ScoringContext, run_steps
from pipeline.store import EmbeddingStore, StoreInfo, shard_ranges

log = logging.getLogger("winnow")

EMBEDDER_STATE_FILE = "embedder_state.npz"


@dataclass
class IngestPlan:
    source: Any
    refs: list[Any]
    shards: list[tuple[int, int]]


@dataclass
class RunStats:
    """Counts and timings collected across stages for run.json and the summary."""

    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)


def plan_ingest(cfg: CurateConfig) -> IngestPlan:
    """Lists the source's samples (uids checked unique) and cuts them into shards."""
    from pipeline.sources import source_from_config

    source = source_from_config(cfg.source.arguments())
    if cfg.source.kind == "precomputed":
        return IngestPlan(source=source, refs=[], shards=[])
    refs = source.refs()
    if not refs:
        raise ValueError(f"source {cfg.source.arguments()} has no samples")
    return IngestPlan(source=source, refs=refs, shards=shard_ranges(len(refs), cfg.embed.shard_size))


def make_embedder(cfg: CurateConfig, plan: IngestPlan, store: EmbeddingStore) -> Any:
    """Builds the configured embedder; the pixels embedder's PCA is fitted once and kept in the store."""
    from pipeline.embed import ClipEmbedder, PixelsEmbedder

    e = cfg.embed
    if e.kind == "clip":
        if e.model_config_file is not None:
            import open_clip

            if not e.model_config_file.exists():
                raise FileNotFoundError(f"embed.model_config_file {e.model_config_file} not found")
            open_clip.add_model_config(e.model_config_file)
        return ClipEmbedder(e.model, None if e.checkpoint else e.pretrained, checkpoint=e.checkpoint, device=e.device)
    if e.kind != "pixels":
        raise ValueError(f"embed.kind {e.kind!r} has no embedder")
    state_path = store.root / EMBEDDER_STATE_FILE
    if state_path.exists():
        with np.load(state_path, allow_pickle=False) as data:
            return PixelsEmbedder.from_state({k: data[k] for k in data.files})
    embedder = PixelsEmbedder(size=e.pixels.size, grey=e.pixels.grey, dim=e.pixels.dim, fit_samples=e.pixels.fit_samples, seed=cfg.seed)
    embedder.fit(_sample_images(plan, e.pixels.fit_samples, seed=cfg.seed, max_side=e.max_side))
    store.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **embedder.state())
    return embedder


def _sample_images(plan: IngestPlan, n: int, *, seed: int, max_side: int) -> list[Any]:
    from pipeline.decode import decode_image

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(plan.refs), size=min(n, len(plan.refs)), replace=False))
    images = []
    for i in picks:
        try:
            result = decode_image(plan.source.read_bytes(plan.refs[i]), max_side=max_side)
        except OSError:
            continue
        if result.image is not None:
            images.append(result.image)
    return images


def init_store(cfg: CurateConfig, plan: IngestPlan, embedder: Any, dim: int) -> EmbeddingStore:
    store = EmbeddingStore(cfg.store_path)
    store.init(
        StoreInfo(
            dim=dim,
            dtype=cfg.embed.dtype,
            embedder=embedder.describe() if embedder is not None else {"kind": "precomputed"},
            source=plan.source.describe(),
            shard_size=cfg.embed.shard_size,
            n_shards=len(plan.shards),
        )
    )
    return store


def embed_shard(
    cfg: CurateConfig, plan: IngestPlan, embedder: Any, store: EmbeddingStore, shard: int, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Embeds one shard into the store unless it is already done. Returns counts by status."""
    from pipeline.embed import embed_refs

    if store.is_done(shard):
        return {"skipped": 1}
    start, stop = plan.shards[shard]
    result = embed_refs(
        plan.source,
        plan.refs[start:stop],
        embedder,
        batch_size=cfg.embed.batch_size,
        num_workers=cfg.embed.num_workers,
        max_side=cfg.embed.max_side,
        progress=progress,
    )
    store.write_shard(shard, result.embeddings, result.meta)
    statuses = [m["status"] for m in result.meta]
    return {s: statuses.count(s) for s in set(statuses)}


def ingest_precomputed(cfg: CurateConfig, plan: IngestPlan) -> EmbeddingStore:
    """Copies precomputed embeddings (LAION/DataComp layout) into a store, one source shard per store shard."""
    shards = list(plan.source.iter_shards())
    if not shards:
        raise ValueError("the precomputed source has no shards")
    dim = shards[0][1].shape[1]
    plan.shards = [(0, 0)] * len(shards)
    store = init_store(cfg, plan, None, dim)
    for shard, (refs, emb) in enumerate(shards):
        if store.is_done(shard):
            continue
        emb = np.asarray(emb, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        ok = np.isfinite(emb).all(axis=1) & (norms[:, 0] > 0)
        meta = [
            {"uid": r.uid, "location": r.location, "label": r.label, "caption": r.caption, "sha1": None,
             "width": 0, "height": 0, "status": "ok" if good else "bad_embedding"}
            for r, good in zip(refs, ok)
        ]
        store.write_shard(shard, emb[ok] / norms[ok], meta)
    return store


def target_key(target: dict[str, Any]) -> str:
    """How a step's `target` source is named in ScoringContext.targets."""
    import json

    return json.dumps(target, sort_keys=True, default=str)


def embed_targets(cfg: CurateConfig, embedder: Any) -> dict[str, np.ndarray]:
    """Embeds every step's `target` source with the run's own embedder (same model, same fitted PCA).

    Each target gets a store of its own under <run_dir>/targets/<n>/, resumable like the main one. With a
    precomputed main store the target must be precomputed embeddings of the same dimension.
    """
    from pipeline.config import SourceConfig

    targets: dict[str, np.ndarray] = {}
    for number, step in enumerate(s for s in cfg.steps if "target" in s.knobs()):
        spec = step.knobs()["target"]
        if not isinstance(spec, dict):
            raise ValueError(f"step {step.scorer}: target must be a source mapping such as {{kind: image_folder, root: ...}}")
        sub = cfg.model_copy(update={"source": SourceConfig.model_validate(spec), "store_dir": cfg.run_dir / "targets" / str(number) / "store"})
        plan = plan_ingest(sub)
        if sub.source.kind == "precomputed":
            store = ingest_precomputed(sub, plan)
        else:
            if embedder is None:
                raise ValueError("an image target needs an image embedder; with precomputed embeddings give a precomputed target")
            store = init_store(sub, plan, embedder, embedder.dim)
            for shard in range(len(plan.shards)):
                embed_shard(sub, plan, embedder, store, shard)
        emb, _ = store.load()
        if len(emb) == 0:
            raise ValueError(f"target {spec} has no usable samples")
        targets[target_key(spec)] = emb
    return targets


def fit_index(cfg: CurateConfig, store: EmbeddingStore, emb: np.ndarray) -> KMeansResult:
    """Spherical k-means over the store, cached under <store>/index keyed by store fingerprint and params."""
    params = KMeansParams(
        k=cfg.index.k, niter=cfg.index.niter, seed=cfg.index.seed, max_points_per_centroid=cfg.index.max_points_per_centroid
    )
    if params.k > len(emb):
        raise ValueError(f"index.k = {params.k} but the store holds only {len(emb)} usable embeddings; lower index.k")
    key = artefact_key(store.fingerprint(), params)
    cached = load_kmeans(store.root / "index", key)
    if cached is not None:
        return cached
    result = spherical_kmeans(emb, params)
    save_kmeans(result, store.root / "index", key)
    if cfg.index.knn:
        from pipeline.index import KnnParams, build_knn_index, save_knn_index

        index, info = build_knn_index(emb, KnnParams(seed=cfg.index.seed))
        save_knn_index(index, info, store.root / "index", key)
    return result


def score_and_assemble(
    cfg: CurateConfig,
    store: EmbeddingStore,
    emb: np.ndarray,
    ok_meta: pl.DataFrame,
    kmeans: KMeansResult,
    targets: dict[str, np.ndarray] | None = None,
) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Runs the configured steps and assembles manifest rows for every sample, unusable ones included."""
    uids = ok_meta["uid"].to_numpy().astype(object)
    labels = ok_meta["label"].to_numpy().astype(object) if ok_meta["label"].null_count() < ok_meta.height else None
    ctx = ScoringContext(
        emb=emb,
        uids=uids,
        labels=labels,
        sha1=ok_meta["sha1"].to_numpy().astype(object),
        kmeans=kmeans,
        alive=np.ones(len(uids), dtype=bool),
        n_scorable=len(uids),
        seed=cfg.seed,
        device=cfg.embed.device,
        targets=targets or {},
    )
    columns, notes = run_steps(ctx, [(s.scorer, s.knobs()) for s in cfg.steps])
    return _assemble(store, ok_meta, kmeans, columns), notes


def _assemble(store: EmbeddingStore, ok_meta: pl.DataFrame, kmeans: KMeansResult, columns: dict[str, Any]) -> pl.DataFrame:
    reason = columns.pop("reason")
    dup_idx = columns.pop("dup_of")
    weight = columns.pop("weight")
    uids = ok_meta["uid"].to_numpy().astype(object)
    dup_uid = np.where(dup_idx >= 0, uids[np.maximum(dup_idx, 0)], None)
    keep = np.array([r is None for r in reason])
    scored = ok_meta.select("uid", "label", "location", "caption", "status").with_columns(
        pl.Series("keep", keep),
        pl.Series("weight", weight),
        pl.Series("cluster", kmeans.assignment.astype(np.int32)),
        pl.Series("reason", reason.tolist(), dtype=pl.String),
        pl.Series("dup_of", dup_uid.tolist(), dtype=pl.String),
        *[pl.Series(name, values) for name, values in columns.items()],
    )
    bad = store.all_meta().filter(pl.col("status") != "ok").select("uid", "label", "location", "caption", "status")
    if bad.height:
        bad = bad.with_columns(
            pl.lit(False).alias("keep"),
            pl.lit(0.0, dtype=pl.Float32).alias("weight"),
            pl.lit(-1, dtype=pl.Int32).alias("cluster"),
            pl.lit("bad_input").alias("reason"),
            pl.lit(None, dtype=pl.String).alias("dup_of"),
        )
        scored = pl.concat([scored, bad], how="diagonal_relaxed")
    return scored.sort("uid")


def run_info(cfg: CurateConfig, store: EmbeddingStore, manifest: pl.DataFrame, notes: list[dict[str, Any]], stats: RunStats) -> dict[str, Any]:
    """The run.json sidecar: config, code version, input fingerprint, counts per stage and reason, timings."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    reasons = manifest.group_by("reason").len().sort("reason")
    return {
        "config": cfg.model_dump(mode="json"),
        "versions": {p: version(p) for p in ("winnow", "torch", "open_clip_torch", "faiss-cpu", "polars", "prefect")},
        "python": platform.python_version(),
        "store": {"path": str(store.root), "fingerprint": store.fingerprint()},
        "counts": {
            "samples": manifest.height,
            "kept": int(manifest["keep"].sum()),
            "by_reason": {"kept" if r is None else str(r): int(c) for r, c in reasons.iter_rows()},
            **stats.counts,
        },
        "steps": notes,
        "orientation": {name: STEPS[name].orientation for name in {s.scorer for s in cfg.steps}},
        "timings_s": {k: round(v, 3) for k, v in stats.timings.items()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def manifest_path_for(cfg: CurateConfig) -> Path:
    return cfg.run_dir / "manifest.parquet"
