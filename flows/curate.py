"""The `curate` Prefect flow: thin tasks over pipeline.stages."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from pipeline import stages
from pipeline.config import CurateConfig
from pipeline.manifest import read_run_info, write_manifest
from pipeline.store import EmbeddingStore

# Inputs are large arrays and open sources: never hash them for Prefect's cache.
stage_task = task(cache_policy=NO_CACHE)


@contextmanager
def _timed(stats: stages.RunStats, name: str):
    start = time.perf_counter()
    yield
    stats.timings[name] = stats.timings.get(name, 0.0) + time.perf_counter() - start


def _io_error_only(task, task_run, state) -> bool:
    """Retry transient I/O failures only; a bad config or a duplicate uid fails the same way every time."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


io_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_io_error_only)


@io_task
def ingest(cfg: CurateConfig) -> stages.IngestPlan:
    plan = stages.plan_ingest(cfg)
    get_run_logger().info("ingest: %d samples in %d shards from %s", len(plan.refs), len(plan.shards), cfg.source.kind)
    return plan


@stage_task
def prepare_embedder(cfg: CurateConfig, plan: stages.IngestPlan) -> tuple[Any, EmbeddingStore]:
    store = EmbeddingStore(cfg.store_path)
    embedder = stages.make_embedder(cfg, plan, store)
    store = stages.init_store(cfg, plan, embedder, embedder.dim)
    done = len(store.done_shards())
    get_run_logger().info("embed: %s, dim %d; %d of %d shards already done", embedder.name, embedder.dim, done, len(plan.shards))
    return embedder, store


@io_task
def embed_shard(cfg: CurateConfig, plan: stages.IngestPlan, embedder: Any, store: EmbeddingStore, shard: int) -> dict[str, int]:
    start, stop = plan.shards[shard]
    with tqdm(total=stop - start, desc=f"embed shard {shard}", unit="img", leave=False, disable=store.is_done(shard)) as bar:
        counts = stages.embed_shard(cfg, plan, embedder, store, shard, progress=bar.update)
    return counts


@io_task
def ingest_precomputed(cfg: CurateConfig, plan: stages.IngestPlan) -> EmbeddingStore:
    return stages.ingest_precomputed(cfg, plan)


@stage_task
def index(cfg: CurateConfig, store: EmbeddingStore):
    emb, ok_meta = store.load()
    if len(emb) == 0:
        raise ValueError("no sample could be decoded; nothing to index (see the store's meta for statuses)")
    kmeans = stages.fit_index(cfg, store, emb)
    get_run_logger().info("index: spherical k-means k=%d on %d embeddings (gpu=%s)", kmeans.params.k, len(emb), kmeans.used_gpu)
    return emb, ok_meta, kmeans


@io_task
def embed_targets(cfg: CurateConfig, embedder: Any) -> dict:
    targets = stages.embed_targets(cfg, embedder)
    get_run_logger().info("targets: %s", {k[:60]: len(v) for k, v in targets.items()})
    return targets


@stage_task
def score(cfg: CurateConfig, store: EmbeddingStore, emb, ok_meta, kmeans, targets):
    return stages.score_and_assemble(cfg, store, emb, ok_meta, kmeans, targets)


@stage_task
def manifest(cfg: CurateConfig, store: EmbeddingStore, frame, notes, stats: stages.RunStats) -> Path:
    info = stages.run_info(cfg, store, frame, notes, stats)
    path = write_manifest(frame, cfg.run_dir, info)
    get_run_logger().info("manifest: %d rows, %d kept → %s", frame.height, int(frame["keep"].sum()), path)
    return path


@stage_task
def report(cfg: CurateConfig, info: dict[str, Any]) -> Path | None:
    """Writes report.html beside the manifest and a Prefect artifact (summary + link) for the UI.

    The manifest is already complete at this point: a failing report is logged, never fatal.
    """
    from prefect.artifacts import create_markdown_artifact

    from pipeline.report import write_report

    logger = get_run_logger()
    try:
        path = write_report(cfg.run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's result must not depend on its report
        logger.warning("report: not written (%s: %s); the manifest is complete", type(exc).__name__, exc)
        return None
    counts = info["counts"]
    rows = "\n".join(f"| {reason} | {n} |" for reason, n in counts["by_reason"].items())
    create_markdown_artifact(
        key=f"winnow-{cfg.name}".lower().replace("_", "-"),
        markdown=(
            f"# winnow run `{cfg.name}`\n\n{counts['kept']} of {counts['samples']} samples kept.\n\n"
            f"| reason | rows |\n|---|---|\n{rows}\n\n"
            f"Report: [{path}](file://{path.resolve()})  \nManifest: `{cfg.run_dir.resolve() / 'manifest.parquet'}`\n"
        ),
        description=f"winnow curate summary for {cfg.name}",
    )
    logger.info("report: %s", path)
    return path


@flow(name="curate", log_prints=True)
def curate(config: dict[str, Any]) -> dict[str, Any]:
    """Embeds a dataset, clusters it, runs the configured scorers and writes a Parquet manifest.

    `config` is the YAML config as a mapping (see pipeline/config.py); it is validated before any work.
    Returns the run summary (also written as run.json beside the manifest).
    """
    cfg = CurateConfig.model_validate(config)
    stats = stages.RunStats()
    with _timed(stats, "ingest"):
        plan = ingest(cfg)
    with _timed(stats, "embed"):
        if cfg.source.kind == "precomputed":
            embedder = None
            store = ingest_precomputed(cfg, plan)
        else:
            embedder, store = prepare_embedder(cfg, plan)
            status_counts: dict[str, int] = {}
            for shard in range(len(plan.shards)):
                for status, count in embed_shard(cfg, plan, embedder, store, shard).items():
                    status_counts[status] = status_counts.get(status, 0) + count
            stats.counts["embed_shards_skipped"] = status_counts.pop("skipped", 0)
    stats.counts["store_status"] = _status_counts(store)
    with _timed(stats, "index"):
        emb, ok_meta, kmeans = index(cfg, store)
    targets = {}
    if any("target" in s.knobs() for s in cfg.steps):
        with _timed(stats, "embed_targets"):
            targets = embed_targets(cfg, embedder)
    with _timed(stats, "score"):
        frame, notes = score(cfg, store, emb, ok_meta, kmeans, targets)
    with _timed(stats, "manifest"):
        path = manifest(cfg, store, frame, notes, stats)
    info = read_run_info(path.parent)
    if cfg.report:
        report(cfg, info)
    return info


def _status_counts(store: EmbeddingStore) -> dict[str, int]:
    meta = store.all_meta()
    return {str(s): int(c) for s, c in meta.group_by("status").len().sort("status").iter_rows()}
