"""The curate stages as plain functions: ingest → embed → index → score → manifest.

flows/curate.py wraps each in a Prefect task; nothing here imports Prefect, so the stages can be
called and tested on their own.
"""
from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path
from pipeline.config import CurateConfig
from pipeline.device import faiss_gpu_available
from pipeline.faults import failpoint
from pipeline.index import KMeansParams, KMeansResult, artefact_key, fit_centroids
from pipeline.rows import StoreRows
from pipeline.fanout import FanOut, serial_fan_out
from pipeline.steps import STEPS, ScoringContext, run_steps
from pipeline.store import META_SCHEMA, EmbeddingStore, StoreInfo, shard_ranges

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
    spans: dict[str, list[float]] = field(default_factory=dict)  # stage → [first start, last end], Unix time

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to stage `name` and stretches its span."""
        start, wall_start = time.perf_counter(), time.time()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.spans[name] = [self.spans.get(name, [wall_start])[0], time.time()]


def plan_ingest(cfg: CurateConfig) -> IngestPlan:
    """Lists the source's samples (uids checked unique) and cuts them into shards."""
    from pipeline.sources import source_from_config

    source = source_from_config(cfg.source.arguments())
    refs = source.refs()
    if not refs:
        raise ValueError(f"source {cfg.source.arguments()} has no samples")
    if cfg.source.kind == "precomputed":  # one store shard per embedding file
        ends = np.cumsum(source.shard_sizes()).tolist()
        return IngestPlan(source=source, refs=refs, shards=list(zip([0, *ends[:-1]], ends)))
    return IngestPlan(source=source, refs=refs, shards=shard_ranges(len(refs), cfg.embed.shard_size))


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
    cfg: CurateConfig, source: Any, refs: list[Any], store_root: str | Path, shard: int, *, embedder: Any = None
) -> dict[str, int]:
    """Embeds one shard (its refs only) into the store unless it is already done. Returns counts by status.

    Without `embedder` (a Dask or Ray worker) the embedder is rebuilt from the config and the store's saved
    state, once per process. Inside a daemonic worker process (Dask's) images are decoded in-process:
    such a process cannot start DataLoader workers.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    from pipeline.embed import embed_refs

    store = EmbeddingStore(store_root)
    if store.is_done(shard):
        return {"skipped": 1}
    embedder = embedder if embedder is not None else worker_embedder(cfg, store.root)
    num_workers = 0 if multiprocessing.current_process().daemon else cfg.embed.num_workers
    with tqdm(total=len(refs), desc=f"embed shard {shard}", unit="img", leave=False) as bar:
        result = embed_refs(
            source, refs, embedder, batch_size=cfg.embed.batch_size, num_workers=num_workers, max_side=cfg.embed.max_side,
            progress=bar.update,
        )
    store.write_shard(shard, result.embeddings, result.meta)
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
    calls = [{"source": plan.source, "refs": plan.refs[start:stop], "store_root": store.root, "shard": shard}
             for shard, (start, stop) in enumerate(plan.shards)]
    (fan_out or serial_fan_out)(ingest_precomputed_shard, calls)
    return store


def ingest_precomputed_shard(source: Any, refs: list[Any], store_root: str | Path, shard: int) -> dict[str, int]:
    """One embedding file into store shard `shard`: rows L2-normalised in float32 chunk by chunk; zero, NaN or Inf
    rows become meta rows with status bad_embedding. Skipped when the shard is done."""
    store = EmbeddingStore(store_root)
    if store.is_done(shard):
        return {"skipped": 1}
    emb = np.load(source.emb_paths[shard], mmap_mode="r")
    if emb.shape[0] != len(refs):
        raise ValueError(f"{source.emb_paths[shard]} has {emb.shape[0]} rows, expected {len(refs)}")
    ok = np.zeros(len(refs), dtype=bool)
    unit = np.empty(emb.shape, dtype=np.float32)
    for s in range(0, len(refs), 65_536):
        x = np.asarray(emb[s:s + 65_536], dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        good = np.isfinite(x).all(axis=1) & (norms[:, 0] > 0)
        ok[s:s + len(x)] = good
        unit[s:s + len(x)] = np.where(good[:, None], x / np.where(good[:, None], norms, 1.0), 0.0)
    meta = [
        {"uid": r.uid, "location": r.location, "label": r.label, "caption": r.caption, "sha1": None,
         "width": 0, "height": 0, "status": "ok" if good else "bad_embedding"}
        for r, good in zip(refs, ok.tolist())
    ]
    store.write_shard(shard, unit[ok], meta)
    return {"ok": int(ok.sum()), "bad_embedding": int((~ok).sum())}


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
            for shard, (start, stop) in enumerate(plan.shards):
                embed_shard(sub, plan.source, plan.refs[start:stop], store.root, shard, embedder=embedder)
        emb, _ = store.load()
        if len(emb) == 0:
            raise ValueError(f"target {spec} has no usable samples")
        targets[target_key(spec)] = emb
    return targets


def open_rows(store: EmbeddingStore) -> tuple[StoreRows, pl.DataFrame]:
    """The store's ok embeddings as a lazy n × d view (nothing read yet) and their meta rows."""
    store.check_complete()
    info = store.info()
    paths, metas = [], []
    for shard, _, meta in store.iter_shards():  # checks every shard's row count and width against its meta
        paths.append(store.emb_path(shard))
        metas.append(meta.filter(pl.col("status") == "ok"))
    rows = StoreRows.open(paths, dim=info.dim, dtype=info.dtype)
    return rows, (pl.concat(metas) if metas else pl.DataFrame(schema=META_SCHEMA))


def kmeans_params(cfg: CurateConfig) -> KMeansParams:
    i = cfg.index
    return KMeansParams(k=i.k, niter=i.niter, seed=i.seed, max_points_per_centroid=i.max_points_per_centroid)


def fit_index(cfg: CurateConfig, store: EmbeddingStore, emb: np.ndarray, fan_out: FanOut = serial_fan_out) -> KMeansResult:
    """Spherical k-means over the store: centroids fitted once on faiss's sample (the fan-in), then every shard
    assigned on its own (the fan-out, one task per shard). Artefacts are cached under <store>/index keyed by the
    store's fingerprint and the parameters; a rerun reassigns only the shards without a saved assignment."""
    params = kmeans_params(cfg)
    if params.k > len(emb):
        raise ValueError(f"index.k = {params.k} but the store holds only {len(emb)} usable embeddings; lower index.k")
    key = artefact_key(store.fingerprint(), params)
    index_dir = store.root / "index"
    centroids_path = index_dir / f"centroids-{key}.npz"
    if centroids_path.exists():
        with np.load(centroids_path, allow_pickle=False) as data:
            centroids, used_gpu = data["centroids"], bool(data["used_gpu"])
    else:
        centroids, used_gpu = fit_centroids(emb, params)
        with atomic_path(centroids_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, centroids=centroids, used_gpu=used_gpu)
    shards = store.done_shards()
    fan_out(assign_shard, [{"store_root": store.root, "shard": s, "centroids": centroids, "key": key} for s in shards])
    parts = [np.load(_assignment_path(store.root, key, s), allow_pickle=False) for s in shards]
    result = KMeansResult(
        centroids=centroids,
        assignment=np.concatenate([p["assignment"] for p in parts]) if parts else np.empty(0, np.int32),
        similarity=np.concatenate([p["similarity"] for p in parts]) if parts else np.empty(0, np.float32),
        params=params,
        used_gpu=used_gpu,
    )
    if cfg.index.knn and not (index_dir / f"knn-{key}.faiss").exists():
        from pipeline.index import KnnParams, build_knn_index, save_knn_index

        index, info = build_knn_index(emb, KnnParams(seed=cfg.index.seed))
        save_knn_index(index, info, index_dir, key)
    return result


def _assignment_path(store_root: Path, key: str, shard: int) -> Path:
    return Path(store_root) / "index" / f"assign-{key}" / f"{shard:05d}.npz"


def assign_shard(store_root: str | Path, shard: int, centroids: np.ndarray, key: str) -> int:
    """Nearest centroid (and its similarity) for every ok row of one shard, saved atomically; returns the rows
    assigned (0 when a saved assignment exists). Reads the shard through a memory map, chunk by chunk."""
    from pipeline.index import nearest_centroid
    from pipeline.store import StoreError

    path = _assignment_path(Path(store_root), key, shard)
    if path.exists():
        return 0
    store = EmbeddingStore(store_root)
    emb = store.read_embeddings(shard)
    sim, ids = nearest_centroid(emb, centroids, spherical=True, use_gpu=faiss_gpu_available())
    if not np.isfinite(sim).all():
        raise StoreError(f"store {store.root} holds NaN or Inf embeddings (shard {shard})")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, assignment=ids, similarity=sim)
    failpoint("assign_shard")
    return len(ids)


def score_and_assemble(
    cfg: CurateConfig,
    store: EmbeddingStore,
    emb: np.ndarray,
    ok_meta: pl.DataFrame,
    kmeans: KMeansResult,
    targets: dict[str, np.ndarray] | None = None,
    fan_out: FanOut | None = None,
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
        fan_out=fan_out,
        cluster_batches=cfg.runner.cluster_batches or 4 * cfg.runner.workers,
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
    bad = store.all_meta(pl.col("status") != "ok", ["uid", "label", "location", "caption", "status"])
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
        "stage_spans": stats.spans,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def store_status_counts(store: EmbeddingStore) -> dict[str, int]:
    meta = store.all_meta(columns=["status"])
    return {str(s): int(c) for s, c in meta.group_by("status").len().sort("status").iter_rows()}


def rows_per_manifest_part(plan: IngestPlan) -> int:
    """One manifest part per store shard."""
    return max(stop - start for start, stop in plan.shards)


def run_in_process(cfg: CurateConfig) -> dict[str, Any]:
    """The curate stages in the flow's order, in this process and without Prefect (every fan-out serial).

    flows/curate.py is the same sequence with tasks; tests and the single-process benchmark use this one.
    Returns run.json's content, plus the manifest stage's own time (run.json is written inside that stage).
    """
    from pipeline.config import check_before_embedding
    from pipeline.manifest import read_run_info, write_manifest

    stats = RunStats()
    with stats.timed("ingest"):
        plan = plan_ingest(cfg)
        check_before_embedding(cfg, plan)
    with stats.timed("embed"):
        embedder = None
        if cfg.source.kind == "precomputed":
            store = ingest_precomputed(cfg, plan)
        else:
            embedder = make_embedder(cfg, plan, EmbeddingStore(cfg.store_path))
            store = init_store(cfg, plan, embedder, embedder.dim)
            for shard, (start, stop) in enumerate(plan.shards):
                embed_shard(cfg, plan.source, plan.refs[start:stop], store.root, shard, embedder=embedder)
        plan.refs = []
    stats.counts["store_status"] = store_status_counts(store)
    with stats.timed("index"):
        emb, ok_meta = open_rows(store)
        kmeans = fit_index(cfg, store, emb)
    targets = {}
    if any("target" in s.knobs() for s in cfg.steps):
        with stats.timed("embed_targets"):
            targets = embed_targets(cfg, embedder)
    with stats.timed("score"):
        frame, notes = score_and_assemble(cfg, store, emb, ok_meta, kmeans, targets)
    with stats.timed("manifest"):
        write_manifest(frame, cfg.run_dir, run_info(cfg, store, frame, notes, stats), rows_per_part=rows_per_manifest_part(plan))
    info = read_run_info(cfg.run_dir)
    info["timings_s"]["manifest"] = round(stats.timings["manifest"], 3)
    info["stage_spans"]["manifest"] = stats.spans["manifest"]
    return info


def manifest_path_for(cfg: CurateConfig) -> Path:
    return cfg.run_dir / "manifest.parquet"
