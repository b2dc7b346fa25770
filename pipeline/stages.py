"""The curate stages as plain functions: ingest → embed → index → score → manifest.

flows/curate.py wraps each in a Prefect task; nothing here imports Prefect, so the stages can be
called and tested on their own.
"""
from __future__ import annotations

import logging
import platform
import time
from collections import Counter
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
    refs: list[Any]  # image sources: every SampleRef, until release_refs(); precomputed: [] (tasks read their own file)
    shards: list[tuple[int, int]]
    n_samples: int
    has_labels: bool

    def release_refs(self) -> None:
        """Drops the per-sample refs (one Python object each) once embedding is done, here and in the source's cache."""
        self.refs = []
        self.source.forget_refs()


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
    """Lists the source's samples (uids checked unique) and cuts them into shards. A precomputed source is
    validated file by file and listed as sizes only: one store shard per embedding file."""
    from pipeline.sources import source_from_config

    source = source_from_config(cfg.source.arguments())
    if cfg.source.kind == "precomputed":
        sizes = source.scan_shards()
        if not sum(sizes):
            raise ValueError(f"source {cfg.source.arguments()} has no samples")
        ends = np.cumsum(sizes).tolist()
        return IngestPlan(source=source, refs=[], shards=list(zip([0, *ends[:-1]], ends)), n_samples=int(ends[-1]),
                          has_labels=source.has_labels())
    refs = source.refs()
    if not refs:
        raise ValueError(f"source {cfg.source.arguments()} has no samples")
    return IngestPlan(source=source, refs=refs, shards=shard_ranges(len(refs), cfg.embed.shard_size), n_samples=len(refs),
                      has_labels=any(r.label is not None for r in refs))


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
    if not ok.all():
        unit = unit[ok]
    meta = samples.with_columns(
        pl.lit(None, dtype=pl.String).alias("sha1"),
        pl.lit(0, dtype=pl.Int32).alias("width"),
        pl.lit(0, dtype=pl.Int32).alias("height"),
        pl.Series("status", np.where(ok, "ok", "bad_embedding"), dtype=pl.String),
    )
    store.write_shard(shard, unit, meta)
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


@dataclass
class OkRows:
    """Facts about the store's ok rows that scoring needs, as a few numbers per row (no Python object per row).

    Row i of the scorers is the i-th ok row in shard order (the order of StoreRows).
    """

    shards: list[int]  # store shards, in order
    ok_counts: list[int]  # ok rows per shard
    uid_rank: np.ndarray  # int64 rank of each row's uid in string order: the scorers' tie-break, same as the uids
    labels: np.ndarray | None  # object array over the few distinct label strings (8 bytes a row); None without labels
    uid_file: Path  # Arrow IPC file of the rows' uids in row order, memory-mapped to name dup_of originals
    bad_rows: int  # meta rows that are not ok (the manifest's bad_input rows)

    def __len__(self) -> int:
        return len(self.uid_rank)

    def bounds(self, position: int) -> tuple[int, int]:
        """Row range of the `position`-th shard."""
        start = sum(self.ok_counts[:position])
        return start, start + self.ok_counts[position]


def open_rows(store: EmbeddingStore) -> tuple[StoreRows, OkRows]:
    """The store's ok embeddings as a lazy n × d view (nothing read yet) and the ok rows' compact facts.

    Reads every shard's meta once (checking row counts and widths against the embeddings). The uids are held as one
    Arrow string column only while they are ranked and written to <store>/index/uids-<fingerprint>.arrow.
    """
    import pyarrow as pa

    store.check_complete()
    info = store.info()
    shards, paths, counts, uids, labels, bad_rows = [], [], [], [], [], 0
    for shard, _, meta in store.iter_shards():
        ok = meta.filter(pl.col("status") == "ok")
        bad_rows += meta.height - ok.height
        shards.append(shard)
        paths.append(store.emb_path(shard))
        counts.append(ok.height)
        uids.append(ok["uid"])
        labels.append(ok["label"])
    all_uids = pl.concat(uids) if uids else pl.Series("uid", [], dtype=pl.String)
    del uids
    uid_rank = (all_uids.rank("ordinal").cast(pl.Int64) - 1).to_numpy()
    uid_file = store.root / "index" / f"uids-{store.fingerprint()}.arrow"
    if not uid_file.exists():
        uid_file.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"uid": all_uids.to_arrow()})
        with atomic_path(uid_file) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=1 << 20)
    del all_uids
    label_column = pl.concat(labels) if labels else pl.Series("label", [], dtype=pl.String)
    rows = StoreRows.open(paths, dim=info.dim, dtype=info.dtype)
    return rows, OkRows(shards=shards, ok_counts=counts, uid_rank=uid_rank, labels=shared_strings(label_column), uid_file=uid_file,
                      bad_rows=bad_rows)


def shared_strings(column: pl.Series) -> np.ndarray | None:
    """An object array of `column` whose equal strings are one Python object (8 bytes a row for a few distinct
    values, e.g. class labels); None when the column is all null."""
    if column.null_count() == len(column):
        return None
    names = np.array([None, *column.drop_nulls().unique().sort().to_list()], dtype=object)
    codes = column.rank("dense").fill_null(0).cast(pl.Int64).to_numpy()
    return names[codes]


def uids_at(uid_file: Path, rows: np.ndarray) -> list[str]:
    """The uids of the given rows, read through a memory map of open_rows' uid file (only the pages touched)."""
    import pyarrow as pa

    with pa.memory_map(str(uid_file)) as source:
        column = pa.ipc.open_file(source).read_all().column("uid")
        return column.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()


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
    )
    return run_steps(ctx, [(s.scorer, s.knobs()) for s in cfg.steps])


def write_curate_manifest(
    cfg: CurateConfig,
    store: EmbeddingStore,
    rows: OkRows,
    kmeans: KMeansResult,
    columns: dict[str, np.ndarray],
    notes: list[dict[str, Any]],
    stats: RunStats,
    fan_out: FanOut | None = None,
) -> tuple[Path, dict[str, int]]:
    """The run's manifest, one part per store shard, each built by a task from its shard's meta and its slice of
    the scored columns; run.json last. Returns the manifest path and the counts written to run.json."""
    from pipeline.manifest import commit_manifest

    counts = manifest_counts(columns["reason"], n_bad=rows.bad_rows)
    info = run_info(cfg, store, counts, notes, stats)
    cluster = kmeans.assignment.astype(np.int32)
    calls = []
    for position, shard in enumerate(rows.shards):
        start, stop = rows.bounds(position)
        part_columns = {name: values[start:stop] for name, values in columns.items()}
        calls.append({"store_root": store.root, "shard": shard, "columns": {**part_columns, "cluster": cluster[start:stop]},
                      "uid_file": rows.uid_file, "index": position})
    return commit_manifest(cfg.run_dir, info, build_manifest_part, calls, fan_out=fan_out), counts


def build_manifest_part(store_root: str | Path, shard: int, columns: dict[str, np.ndarray], uid_file: Path, path: Path) -> int:
    """One store shard's manifest rows, sorted by uid: its ok rows with their scored columns (dup_of row numbers
    named by uid), its unusable rows as reason bad_input. Validated and written to `path`; returns the rows."""
    from pipeline.manifest import conform, validate, write_part

    meta = EmbeddingStore(store_root).read_meta(shard).select("uid", "label", "location", "caption", "status")
    columns = dict(columns)
    reason, dup_idx, weight, cluster = columns.pop("reason"), columns.pop("dup_of"), columns.pop("weight"), columns.pop("cluster")
    dup_uid = np.full(len(dup_idx), None, dtype=object)
    has_dup = dup_idx >= 0
    if has_dup.any():
        dup_uid[has_dup] = uids_at(uid_file, dup_idx[has_dup])
    ok = meta.filter(pl.col("status") == "ok").with_columns(
        pl.Series("keep", np.array([r is None for r in reason], dtype=bool)),
        pl.Series("weight", weight),
        pl.Series("cluster", cluster),
        pl.Series("reason", reason.tolist(), dtype=pl.String),
        pl.Series("dup_of", dup_uid.tolist(), dtype=pl.String),
        *[pl.Series(name, values) for name, values in columns.items()],
    )
    bad = meta.filter(pl.col("status") != "ok").with_columns(
        pl.lit(False).alias("keep"),
        pl.lit(0.0, dtype=pl.Float32).alias("weight"),
        pl.lit(-1, dtype=pl.Int32).alias("cluster"),
        pl.lit("bad_input").alias("reason"),
        pl.lit(None, dtype=pl.String).alias("dup_of"),
    )
    part = conform(pl.concat([ok, bad], how="diagonal_relaxed").sort("uid"))
    validate(part)
    return write_part(part, path)


def manifest_counts(reason: np.ndarray, *, n_bad: int) -> dict[str, Any]:
    """run.json's counts for a manifest of the scored rows' `reason`s (None = kept) plus n_bad bad_input rows."""
    by_reason = {("kept" if r is None else str(r)): n for r, n in Counter(reason.tolist()).items()}
    if n_bad:
        by_reason["bad_input"] = by_reason.get("bad_input", 0) + n_bad
    return {"samples": len(reason) + n_bad, "kept": by_reason.get("kept", 0), "by_reason": dict(sorted(by_reason.items()))}


def run_info(cfg: CurateConfig, store: EmbeddingStore, counts: dict[str, Any], notes: list[dict[str, Any]], stats: RunStats) -> dict[str, Any]:
    """The run.json sidecar: config, code version, input fingerprint, counts per stage and reason, timings."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "config": cfg.model_dump(mode="json"),
        "versions": {p: version(p) for p in ("winnow", "torch", "open_clip_torch", "faiss-cpu", "polars", "prefect")},
        "python": platform.python_version(),
        "store": {"path": str(store.root), "fingerprint": store.fingerprint()},
        "counts": {**counts, **stats.counts},
        "steps": notes,
        "orientation": {name: STEPS[name].orientation for name in {s.scorer for s in cfg.steps}},
        "timings_s": {k: round(v, 3) for k, v in stats.timings.items()},
        "stage_spans": stats.spans,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def store_status_counts(store: EmbeddingStore) -> dict[str, int]:
    """Meta rows by status over every finished shard (counted shard by shard)."""
    counts: dict[str, int] = {}
    for shard in store.done_shards():
        for status, n in store.read_meta(shard).group_by("status").len().iter_rows():
            counts[str(status)] = counts.get(str(status), 0) + int(n)
    return dict(sorted(counts.items()))


def run_in_process(cfg: CurateConfig) -> dict[str, Any]:
    """The curate stages in the flow's order, in this process and without Prefect (every fan-out serial).

    flows/curate.py is the same sequence with tasks; tests and the single-process benchmark use this one.
    Returns run.json's content, plus the manifest stage's own time (run.json is written inside that stage).
    """
    from pipeline.config import check_before_embedding
    from pipeline.manifest import read_run_info

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
        plan.release_refs()
    stats.counts["store_status"] = store_status_counts(store)
    with stats.timed("index"):
        emb, rows = open_rows(store)
        kmeans = fit_index(cfg, store, emb)
    targets = {}
    if any("target" in s.knobs() for s in cfg.steps):
        with stats.timed("embed_targets"):
            targets = embed_targets(cfg, embedder)
    with stats.timed("score"):
        columns, notes = score(cfg, store, emb, rows, kmeans, targets)
    with stats.timed("manifest"):
        write_curate_manifest(cfg, store, rows, kmeans, columns, notes, stats)
    info = read_run_info(cfg.run_dir)
    info["timings_s"]["manifest"] = round(stats.timings["manifest"], 3)
    info["stage_spans"]["manifest"] = stats.spans["manifest"]
    if cfg.evaluate is not None:
        from pipeline.evaluate import evaluate_run

        info["evaluation"] = evaluate_run(cfg.run_dir, cfg.evaluate)
    return info


def manifest_path_for(cfg: CurateConfig) -> Path:
    return cfg.run_dir / "manifest.parquet"
