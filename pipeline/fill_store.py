"""Filling embedding stores: the embedder built (the pixels PCA fitted once), image shards embedded, precomputed
embedding files copied in, and the steps' target sources embedded into stores of their own."""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline import progress
from pipeline.atomic import atomic_path
from pipeline.config import CurateConfig, SourceConfig
from pipeline.faults import failpoint
from pipeline.fanout import FanOut, serial_fan_out
from pipeline.ingest import IngestPlan, plan_ingest
from pipeline.store import EmbeddingStore, StoreInfo
from scorers.step import EvalSet, target_key

EMBEDDER_STATE_FILE = "embedder_state.npz"


def make_embedder(cfg: CurateConfig, plan: IngestPlan | None, store: EmbeddingStore) -> Any:
    """Builds the configured embedder; the pixels embedder's PCA is fitted once and kept in the store."""
    from pipeline.embed import ClipEmbedder, PixelsEmbedder

    e = cfg.embed
    if e.kind == "clip":
        if e.model_config_file is not None:
            import open_clip

            if not e.model_config_file.exists():
                raise FileNotFoundError(f"embed.model_config_file {e.model_config_file} not found")
            open_clip.add_model_config(e.model_config_file)
        return ClipEmbedder(e.model, None if e.checkpoint else e.pretrained, checkpoint=e.checkpoint, device=e.device,
                            decode=e.decode)
    if e.kind != "pixels":
        raise ValueError(f"embed.kind {e.kind!r} has no embedder")
    state_path = store.root / EMBEDDER_STATE_FILE
    if state_path.exists():
        with np.load(state_path, allow_pickle=False) as data:
            return PixelsEmbedder.from_state({k: data[k] for k in data.files})
    embedder = PixelsEmbedder(size=e.pixels.size, grey=e.pixels.grey, dim=e.pixels.dim, fit_samples=e.pixels.fit_samples, seed=cfg.seed)
    embedder.fit(_sample_images(plan, e.pixels.fit_samples, seed=cfg.seed, max_side=e.max_side, max_pixels=e.max_pixels))
    store.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(state_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **embedder.state())
    return embedder


def _sample_images(plan: IngestPlan, n: int, *, seed: int, max_side: int, max_pixels: int | None) -> Iterator[Any]:
    """The fit sample, one decoded image at a time: the fit keeps only each image's small pixel vector, so its memory
    does not depend on the source images' size."""
    from pipeline.decode import decode_image

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(plan.refs), size=min(n, len(plan.refs)), replace=False))
    for i in picks:
        try:
            result = decode_image(plan.source.read_bytes(plan.refs[i]), max_side=max_side, max_pixels=max_pixels)
        except OSError:
            continue
        if result.image is not None:
            yield result.image


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
    cfg: CurateConfig, source: Any, refs: list[Any], store_root: str | Path, shard: int, *, embedder: Any = None
) -> dict[str, int]:
    """Embeds one shard (its refs only) into the store unless it is already done. Returns counts by status.

    Without `embedder` (a Dask or Ray worker) the embedder is rebuilt from the config and the store's saved
    state, once per process. Inside a daemonic worker process (Dask's) images are decoded in-process:
    such a process cannot start DataLoader workers.
    """
    from pipeline.embed import embed_refs
    from scorers.quality import image_stats

    store = EmbeddingStore(store_root)
    if store.is_done(shard):
        return {"skipped": 1}
    embedder = embedder if embedder is not None else worker_embedder(cfg, store.root)
    num_workers = 0 if multiprocessing.current_process().daemon else cfg.embed.num_workers
    result = embed_refs(
        source, refs, embedder, batch_size=cfg.embed.batch_size, num_workers=num_workers, max_side=cfg.embed.max_side,
        max_pixels=cfg.embed.max_pixels, image_stats=image_stats,
        progress=progress.advance,  # the stage's one overall display (pipeline/progress.py)
    )
    # quality statistics measured on the pixels decoded for the model go into the store's meta (no second pass)
    meta = [row if st is None else {**row, **st} for row, st in zip(result.meta, result.stats or [None] * len(result.meta))]
    store.write_shard(shard, result.embeddings, meta)
    failpoint("embed_shard")
    statuses = [m["status"] for m in result.meta]
    return {s: statuses.count(s) for s in set(statuses)}


_WORKER_EMBEDDERS: dict[tuple[str, str], Any] = {}


def worker_embedder(cfg: CurateConfig, store_root: Path) -> Any:
    """The run's embedder rebuilt in a worker process (kept for the process's later shards)."""
    key = (cfg.embed.model_dump_json(), str(store_root))
    if key not in _WORKER_EMBEDDERS:
        if cfg.embed.kind == "pixels" and not (store_root / EMBEDDER_STATE_FILE).exists():
            raise ValueError(f"{store_root / EMBEDDER_STATE_FILE} missing: the flow fits the pixels embedder before embedding")
        _WORKER_EMBEDDERS[key] = make_embedder(cfg, None, EmbeddingStore(store_root))
    return _WORKER_EMBEDDERS[key]


def ingest_precomputed(cfg: CurateConfig, plan: IngestPlan, fan_out: FanOut | None = None) -> EmbeddingStore:
    """Copies precomputed embeddings (LAION/DataComp layout) into a store, one embedding file per store shard
    (one task per file with a fan_out)."""
    if not plan.shards:
        raise ValueError("the precomputed source has no shards")
    header = np.load(plan.source.emb_paths[0], mmap_mode="r")
    store = init_store(cfg, plan, None, header.shape[1])
    calls = [{"source": plan.source, "store_root": store.root, "shard": shard} for shard in range(len(plan.shards))]
    (fan_out or serial_fan_out)(ingest_precomputed_shard, calls)
    return store


def ingest_precomputed_shard(source: Any, store_root: str | Path, shard: int) -> dict[str, int]:
    """One embedding file into store shard `shard`: rows L2-normalised in float32 chunk by chunk; zero, NaN or Inf
    rows become meta rows with status bad_embedding. Skipped when the shard is done."""
    store = EmbeddingStore(store_root)
    if store.is_done(shard):
        return {"skipped": 1}
    samples = source.shard_frame(shard)
    emb = np.load(source.emb_paths[shard], mmap_mode="r")
    n = samples.height
    ok = np.zeros(n, dtype=bool)
    unit = np.empty(emb.shape, dtype=store.info().dtype)  # normalised in float32, held in the store's dtype
    for s in range(0, n, 65_536):
        x = np.asarray(emb[s:s + 65_536], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        good = np.isfinite(x).all(axis=1) & (norms[:, 0] > 0)
        ok[s:s + len(x)] = good
        unit[s:s + len(x)] = np.where(good[:, None], x / np.where(good[:, None], norms, 1.0), 0.0)
    text = source.text_embeddings(shard)
    if text is not None:  # caption embeddings: unit rows; a zero or non-finite row means "no caption" (stored as 0)
        text_unit = np.zeros(emb.shape, dtype=store.info().dtype)
        for s in range(0, n, 65_536):
            t = np.asarray(text[s:s + 65_536], dtype=np.float32)
            norms = np.linalg.norm(t, axis=1, keepdims=True)
            good = np.isfinite(t).all(axis=1) & np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)
            text_unit[s:s + len(t)] = np.where(good[:, None], t / np.where(good[:, None], norms, 1.0), 0.0)
        text = text_unit[ok]
    if not ok.all():
        unit = unit[ok]
    meta = samples.with_columns(
        pl.lit(None, dtype=pl.String).alias("sha1"),
        pl.lit(0, dtype=pl.Int32).alias("width"),
        pl.lit(0, dtype=pl.Int32).alias("height"),
        pl.Series("status", np.where(ok, "ok", "bad_embedding"), dtype=pl.String),
    )
    store.write_shard(shard, unit, meta, text_embeddings=text)
    return {"ok": int(ok.sum()), "bad_embedding": int((~ok).sum())}


def embed_targets(cfg: CurateConfig, embedder: Any) -> dict[str, Any]:
    """Embeds every step's `target` source and every source of a step's `eval_sources` with the run's own embedder
    (same model, same fitted PCA).

    Each gets a store of its own under <run_dir>/targets/<n>/, resumable like the main one. With a precomputed main
    store it must be precomputed embeddings of the same dimension. A target maps to its embeddings (key target_key);
    an eval source to a scorers.step.EvalSet (embeddings, uids, byte hashes; key "eval:" + target_key): leak matches exact
    copies by hash first.
    """
    specs: list[tuple[str, dict[str, Any], bool]] = []
    for step in cfg.steps:
        knobs = step.knobs()
        if knobs.get("target") is not None:  # optional for some steps (outlier)
            specs.append((step.scorer, knobs["target"], False))
        specs += [(step.scorer, spec, True) for spec in knobs.get("eval_sources") or []]
    targets: dict[str, Any] = {}
    loaded: dict[str, tuple[Any, Any]] = {}  # one embedding per distinct source (an outlier target may be leak's eval source)
    for number, (scorer, spec, is_eval) in enumerate(specs):
        what = "eval source" if is_eval else "target"
        if not isinstance(spec, dict):
            raise ValueError(f"step {scorer}: {what} must be a source mapping such as {{kind: image_folder, root: ...}}")
        if target_key(spec) in loaded:
            emb, meta = loaded[target_key(spec)]
            _add_target(targets, spec, emb, meta, is_eval)
            continue
        sub = cfg.model_copy(update={"source": SourceConfig.model_validate(spec), "store_dir": cfg.run_dir / "targets" / str(number) / "store"})
        plan = plan_ingest(sub)
        if sub.source.kind == "precomputed":
            store = ingest_precomputed(sub, plan)
        else:
            if embedder is None:
                raise ValueError(f"an image {what} needs an image embedder; with precomputed embeddings give precomputed ones")
            store = init_store(sub, plan, embedder, embedder.dim)
            for shard, (start, stop) in enumerate(plan.shards):
                embed_shard(sub, plan.source, plan.refs[start:stop], store.root, shard, embedder=embedder)
        emb, meta = store.load()
        if len(emb) == 0:
            raise ValueError(f"{what} {spec} has no usable samples")
        loaded[target_key(spec)] = (emb, meta)
        _add_target(targets, spec, emb, meta, is_eval)
    return targets


def _add_target(targets: dict[str, Any], spec: dict[str, Any], emb: Any, meta: pl.DataFrame, is_eval: bool) -> None:
    if is_eval:
        ok = meta.filter(pl.col("status") == "ok")
        name = str(spec.get("root") or spec.get("urls") or spec.get("path") or spec.get("kind"))
        targets["eval:" + target_key(spec)] = EvalSet(name=name, emb=emb, uids=ok["uid"].to_numpy().astype(object),
                                                      sha1=ok["sha1"].to_numpy().astype(object))
    else:
        targets[target_key(spec)] = emb


def needs_targets(cfg: CurateConfig) -> bool:
    """Whether a step names a `target` or `eval_sources` to embed before scoring."""
    return any(s.knobs().get("target") is not None or s.knobs().get("eval_sources") for s in cfg.steps)
