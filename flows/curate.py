"""The `curate` Prefect flow: thin tasks over the stage functions in pipeline/ (their order: pipeline/stages.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import Opaque, io_task, make_task_runner, prefect_fan_out, shared_api
from pipeline import clustering, fill_store, ok_rows, run_record, scoring
from pipeline.config import CurateConfig, check_before_embedding
from pipeline.ingest import IngestPlan, listing_counts, plan_ingest
from pipeline.manifest import export_run, read_run_info
from pipeline.store import EmbeddingStore

# Inputs are large arrays and open sources: never hash them for Prefect's cache.
stage_task = task(cache_policy=NO_CACHE)


@io_task
def ingest(cfg: CurateConfig) -> IngestPlan:
    plan = plan_ingest(cfg)
    get_run_logger().info("ingest: %d samples in %d shards from %s", plan.n_samples, len(plan.shards), cfg.source.kind)
    return plan


@stage_task
def prepare_embedder(cfg: CurateConfig, opaque_plan: Opaque) -> tuple[Any, EmbeddingStore]:
    plan: IngestPlan = opaque_plan.value
    store = EmbeddingStore(cfg.store_path)
    embedder = fill_store.make_embedder(cfg, plan, store)
    store = fill_store.init_store(cfg, plan, embedder, embedder.dim)
    done = len(store.done_shards())
    get_run_logger().info("embed: %s, dim %d; %d of %d shards already done", embedder.name, embedder.dim, done, len(plan.shards))
    return embedder, store


@stage_task
def open_rows(store: EmbeddingStore):
    emb, rows = ok_rows.open_rows(store)
    if len(rows) == 0:
        raise ValueError("no sample could be decoded; nothing to index (see the store's meta for statuses)")
    return emb, rows


@io_task
def embed_targets(cfg: CurateConfig, embedder: Any) -> dict:
    targets = fill_store.embed_targets(cfg, embedder)
    get_run_logger().info("targets: %s", {k[:60]: len(getattr(v, "emb", v)) for k, v in targets.items()})
    return targets


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


@stage_task
def evaluate(cfg: CurateConfig) -> dict[str, Any]:
    """The config's `evaluate:` block: the run's selection against random (pipeline/evaluate.py), into run.json."""
    from pipeline.evaluate import evaluate_run, format_evaluation

    result = evaluate_run(cfg.run_dir, cfg.evaluate)
    get_run_logger().info("%s", format_evaluation(result))
    return result


@io_task
def export(cfg: CurateConfig) -> str:
    uri = export_run(cfg.run_dir, cfg.export_uri)
    get_run_logger().info("export: manifest, report and run.json copied to %s", uri)
    return uri


def run_curate(config: dict[str, Any]) -> dict[str, Any]:
    """Runs the curate flow on the task runner its config names (`runner:`): the entry point for the CLI."""
    cfg = CurateConfig.model_validate(config)
    with shared_api(cfg.runner):
        return curate.with_options(task_runner=make_task_runner(cfg.runner))(config)


@flow(name="curate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate(config: dict[str, Any]) -> dict[str, Any]:
    """Embeds a dataset, clusters it, runs the configured scorers and writes a Parquet manifest.

    `config` is the YAML config as a mapping (see pipeline/config.py); it is validated before any work.
    Fan-out work (embedding shards, assignment shards, SemDeDup cluster batches) runs as tasks on the flow's
    task runner (use run_curate to pick it from the config); fan-in work runs once here.
    Returns the run summary (also written as run.json beside the manifest).
    """
    cfg = CurateConfig.model_validate(config)
    logger = get_run_logger()
    stats = run_record.RunStats()
    with stats.timed("ingest"):
        plan = ingest(cfg)
        check_before_embedding(cfg, plan)  # k > N, empty targets, labels: refused before any embedding
        stats.counts.update(listing_counts(plan))  # unlistable folders: in run.json and the summary
    with stats.timed("embed"):
        if cfg.source.kind == "precomputed":
            embedder = None
            store = fill_store.ingest_precomputed(cfg, plan, fan_out=prefect_fan_out)
        else:
            embedder, store = prepare_embedder(cfg, Opaque(plan))
            # a worker process rebuilds the embedder from the config and the store's saved state
            local = cfg.runner.kind == "local"
            calls = [
                {"cfg": cfg, "source": plan.source, "refs": plan.refs[start:stop], "store_root": store.root, "shard": shard,
                 "embedder": embedder if local else None}
                for shard, (start, stop) in enumerate(plan.shards)
            ]
            status_counts: dict[str, int] = {}
            for counts in prefect_fan_out(fill_store.embed_shard, calls):
                for status, count in counts.items():
                    status_counts[status] = status_counts.get(status, 0) + count
            stats.counts["embed_shards_skipped"] = status_counts.pop("skipped", 0)
            del calls
        plan.release_refs()  # one object per sample, not needed past embedding: freed before scoring
    stats.counts["store_status"] = run_record.store_status_counts(store)
    with stats.timed("index"):
        emb, rows = open_rows(store)
        kmeans = clustering.fit_index(cfg, store, emb, fan_out=prefect_fan_out)
        logger.info("index: spherical k-means k=%d on %d embeddings (gpu=%s)", kmeans.params.k, len(emb), kmeans.used_gpu)
    targets = {}
    if fill_store.needs_targets(cfg):
        with stats.timed("embed_targets"):
            targets = embed_targets(cfg, embedder)
    with stats.timed("score"):
        columns, notes = scoring.score(cfg, store, emb, rows, kmeans, targets, fan_out=prefect_fan_out)
    with stats.timed("manifest"):  # one part per store shard, built and written by tasks; run.json last
        path, counts = run_record.write_curate_manifest(cfg, store, rows, kmeans, columns, notes, stats, fan_out=prefect_fan_out)
        logger.info("manifest: %d rows, %d kept → %s", counts["samples"], counts["kept"], path)
    info = read_run_info(path.parent)
    # run.json was written inside the manifest stage: the caller's copy also gets that stage's own time
    info["timings_s"]["manifest"] = round(stats.timings["manifest"], 3)
    info["stage_spans"]["manifest"] = stats.spans["manifest"]
    if cfg.evaluate is not None:
        with stats.timed("evaluate"):
            info["evaluation"] = evaluate(cfg)
        info["timings_s"]["evaluate"] = round(stats.timings["evaluate"], 3)
    if cfg.report:
        report(cfg, info)
    if cfg.export_uri:
        info["exported_to"] = export(cfg)
    return info

