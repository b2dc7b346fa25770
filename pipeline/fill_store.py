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
from pipeline.changes import Increment, fingerprint_hex, plan_image_increment, plan_precomputed_increment, row_fingerprints
from pipeline.store import META_SCHEMA, EmbeddingStore, StoreError, StoreInfo
from pipeline.text_source import unit_rows
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
            embedder = PixelsEmbedder.from_state({k: data[k] for k in data.files})
        # the fitted PCA is reused only for the settings it was fitted with: another size, colour mode, dim or seed
        # is another embedding space, never a silent reuse
        asked = {"embed.pixels.size": e.pixels.size, "embed.pixels.grey": e.pixels.grey, "embed.pixels.dim": e.pixels.dim,
                 "seed": cfg.seed}
        stored = {"embed.pixels.size": embedder.size, "embed.pixels.grey": embedder.grey, "embed.pixels.dim": embedder.dim,
                  "seed": embedder.seed}
        differing = [f"{k}: {stored[k]} → {asked[k]}" for k in asked if stored[k] != asked[k]]
        if differing:
            raise StoreError(f"store {store.root} holds pixels embeddings made with other settings ({'; '.join(differing)}); "
                             "use a new store_dir or delete this store")
        return embedder
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
    cfg: CurateConfig, source: Any, refs: list[Any], store_root: str | Path, shard: int, *, embedder: Any = None,
    tag: str | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Embeds one shard (its refs only) into the store unless it is already done (for the plan `tag`). Returns counts
    by status. `extra`: meta columns to add, each one value per ref or one value for all (size, mtime_ns, generation).

    Without `embedder` (a Dask or Ray worker) the embedder is rebuilt from the config and the store's saved
    state, once per process. Inside a daemonic worker process (Dask's) images are decoded in-process:
    such a process cannot start DataLoader workers.
    """
    from pipeline.embed import embed_refs
    from scorers.quality import image_stats

    store = EmbeddingStore(store_root)
    if store.is_done(shard, tag):
        return {"skipped": 1}
    embedder = embedder if embedder is not None else worker_embedder(cfg, store.root)
    num_workers = 0 if multiprocessing.current_process().daemon else cfg.embed.num_workers
    result = embed_refs(
        source, refs, embedder, batch_size=cfg.embed.batch_size, num_workers=num_workers, max_side=cfg.embed.max_side,
        max_pixels=cfg.embed.max_pixels, image_stats=image_stats,
        progress=progress.advance,  # the stage's one overall display (pipeline/progress.py)
    )
    # quality statistics measured on the pixels decoded for the model go into the store's meta (no second pass)
    rows = [row if st is None else {**row, **st} for row, st in zip(result.meta, result.stats or [None] * len(result.meta))]
    meta = pl.DataFrame([{c: row.get(c) for c in META_SCHEMA} for row in rows], schema=META_SCHEMA, orient="row")
    for name, values in (extra or {}).items():  # change-detection columns from the listing
        meta = meta.with_columns(pl.Series(name, np.broadcast_to(np.asarray(values), (meta.height,)), dtype=META_SCHEMA[name]))
    store.write_shard(shard, result.embeddings, meta, tag=tag)
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


def image_jobs(cfg: CurateConfig, plan: IngestPlan, store: EmbeddingStore) -> tuple[Increment, list[dict[str, Any]]]:
    """The store's increment for an image source (pipeline.changes) and one embed_shard call (minus cfg, source,
    store_root and embedder) per new shard: its refs (the shard's rows of the columnar listing), shard number, tag and
    change-detection columns."""
    inc = plan_image_increment(store, plan.source, plan.refs, cfg.embed.shard_size)
    generation = store.generation() + 1
    assert inc.listing is not None
    sizes, tokens = inc.listing["size"].to_numpy(), inc.listing["mtime_ns"].to_numpy()
    jobs = [{"refs": plan.refs.take(job.rows), "shard": job.shard, "tag": job.tag,
             "extra": {"size": sizes[job.rows], "mtime_ns": tokens[job.rows], "generation": generation}} for job in inc.jobs]
    return inc, jobs


def commit_increment(store: EmbeddingStore, inc: Increment) -> int:
    """Publishes the increment (new shards live, tombstones added) unless it changes nothing; returns the store's
    generation. Call only once every job's shard is written."""
    if not inc.jobs and not len(inc.dead) and store.catalog() is not None:
        return store.generation()
    generation = inc.commit(store)
    failpoint("store_commit")
    return generation


def ingest_precomputed(cfg: CurateConfig, plan: IngestPlan, fan_out: FanOut | None = None) -> EmbeddingStore:
    """Brings a store up to date with precomputed embeddings (LAION/DataComp layout): file pairs unchanged since
    the last run are not read; rows of new or changed files that are new or changed are copied, one new store shard
    per file (one task per file with a fan_out); rows gone are tombstoned (pipeline.changes)."""
    if not plan.shards:
        raise ValueError("the precomputed source has no shards")
    header = np.load(plan.source.emb_paths[0], mmap_mode="r")
    store = init_store(cfg, plan, None, header.shape[1])
    inc = plan_precomputed_increment(store, plan.source)
    generation = store.generation() + 1
    calls = [{"source": plan.source, "store_root": store.root, "shard": job.shard, "file": job.file, "rows": job.rows,
              "tag": job.tag, "generation": generation} for job in inc.jobs]
    (fan_out or serial_fan_out)(ingest_precomputed_shard, calls)
    commit_increment(store, inc)
    return store


def ingest_precomputed_shard(source: Any, store_root: str | Path, shard: int, file: int | None = None,
                             rows: np.ndarray | None = None, tag: str | None = None, generation: int | None = None) -> dict[str, int]:
    """Rows `rows` (default: all) of embedding file `file` (default: `shard`) into store shard `shard`: L2-normalised
    in float32 chunk by chunk; zero, NaN or Inf rows become meta rows with status bad_embedding; sha1 holds a 64-bit
    fingerprint of each source row's bytes (change detection). Skipped when the shard is done for `tag`."""
    store = EmbeddingStore(store_root)
    if store.is_done(shard, tag):
        return {"skipped": 1}
    file = shard if file is None else file
    samples = source.shard_frame(file)
    emb = np.load(source.emb_paths[file], mmap_mode="r")
    rows = np.arange(samples.height) if rows is None else np.asarray(rows, dtype=np.int64)
    samples = samples[rows.tolist()] if len(rows) != samples.height else samples
    n = len(rows)
    ok = np.zeros(n, dtype=bool)
    fingerprints = np.empty(n, dtype=np.uint64)
    unit = np.empty((n, emb.shape[1]), dtype=store.info().dtype)  # normalised in float32, held in the store's dtype
    for s in range(0, n, 65_536):
        raw = np.asarray(emb[rows[s:s + 65_536]])
        fingerprints[s:s + len(raw)] = row_fingerprints(raw)
        x = raw.astype(np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        good = np.isfinite(x).all(axis=1) & (norms[:, 0] > 0)
        ok[s:s + len(x)] = good
        unit[s:s + len(x)] = np.where(good[:, None], x / np.where(good[:, None], norms, 1.0), 0.0)
    text = source.text_embeddings(file)  # one row per file row (DataComp .npz: matched by uid)
    if text is not None:  # caption embeddings: unit rows; a zero or non-finite row means "no caption" (stored as 0)
        text_unit = np.zeros((n, emb.shape[1]), dtype=store.info().dtype)
        for s in range(0, n, 65_536):
            text_unit[s:s + 65_536] = unit_rows(text[rows[s:s + 65_536]])
        text = text_unit[ok]
    if not ok.all():
        unit = unit[ok]
    meta = samples.with_columns(
        fingerprint_hex(fingerprints),
        pl.lit(0, dtype=pl.Int32).alias("width"),
        pl.lit(0, dtype=pl.Int32).alias("height"),
        pl.Series("status", np.where(ok, "ok", "bad_embedding"), dtype=pl.String),
        pl.lit(generation, dtype=pl.Int64).alias("generation"),
    )
    store.write_shard(shard, unit, meta, text_embeddings=text, tag=tag)
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
            inc, jobs = image_jobs(sub, plan, store)
            for job in jobs:
                embed_shard(sub, plan.source, job.pop("refs"), store.root, embedder=embedder, **job)
            commit_increment(store, inc)
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
