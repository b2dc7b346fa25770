"""The curate stage sequence, defined once: ingest → embed → index → score → manifest → report → export.

How the work runs is the parameter: an `Executor` runs each fan-in stage (`stage`) and each fan-out
(`fan_out`, independent units such as store shards and cluster batches). `InProcess` runs everything here, one
call after another (tests, the single-process benchmark); flows/curate.py passes one that makes every stage a
named Prefect task and every fan-out a set of tasks on the flow's task runner. Nothing here imports Prefect.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pipeline.append import decide
from pipeline.append_shards import append_by_shard
from pipeline.config import CurateConfig, check_before_embedding
from pipeline.fanout import serial_fan_out
from pipeline.fill_store import (commit_increment, embed_shard, embed_targets, image_jobs, ingest_precomputed, init_store,
                                 make_embedder, needs_targets)
from pipeline.ingest import IngestPlan, listing_counts, plan_ingest
from pipeline.manifest import export_run, read_run_info
from pipeline.ok_rows import OkRows, open_rows
from pipeline.run_record import RunStats, store_status_counts, write_append_manifest, write_curate_manifest
from pipeline.runlock import acquire, describe
from pipeline.store import EmbeddingStore, meta_cache

log = logging.getLogger("winnow")
T = TypeVar("T")


class Executor(Protocol):
    """How a curate run's stages and fan-outs run."""

    #: the fan-out shares this process's memory (threads or serial): live objects such as the embedder may be
    #: handed to it; otherwise workers rebuild them from the config and the store
    shares_memory: bool
    #: the Prefect flow-run id and UI/API link of this run, recorded in the run lock and run.json (None outside Prefect)
    flow_run_id: str | None
    flow_run_url: str | None

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Runs fn(*args, **kwargs) as the stage `name` and returns its result."""

    def fan_out(self, fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
        """Runs fn(**call) for every call; results in order."""

    def log(self, message: str) -> None:
        """A progress or summary line for the run's log."""

    def previous_run_died(self, holder: dict[str, Any]) -> None:
        """An earlier run of this run directory died holding its lock (`holder`, its lock record): report it."""

    def published(self, cfg: CurateConfig, info: dict[str, Any], report_path: Any) -> None:
        """The run is finished (manifest, run.json and report written): publish a summary where the runner shows them."""


class InProcess:
    """Every stage and every fan-out call in this process, one after another, without Prefect."""

    shares_memory = True
    flow_run_id = None
    flow_run_url = None

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def fan_out(self, fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
        return serial_fan_out(fn, calls)

    def log(self, message: str) -> None:
        log.info(message)

    def previous_run_died(self, holder: dict[str, Any]) -> None:
        log.warning("an earlier run of this run directory did not finish: %s; taking over", describe(holder))

    def published(self, cfg: CurateConfig, info: dict[str, Any], report_path: Any) -> None:
        return None


def run_curate_sequence(cfg: CurateConfig, ex: Executor) -> dict[str, Any]:
    """Runs the whole curate sequence for a validated config under the run directory's lock (one run at a time).

    Returns run.json's content (plus the manifest stage's own time, which run.json cannot hold: it is written
    inside that stage) and, when exported, `exported_to`.
    """
    with acquire(cfg.run_dir, flow_run_id=ex.flow_run_id) as lock, meta_cache():
        if lock.previous is not None:
            ex.previous_run_died(lock.previous)
        return _sequence(cfg, ex)


def _sequence(cfg: CurateConfig, ex: Executor) -> dict[str, Any]:
    stats = RunStats()
    stats.flow_run = {"id": ex.flow_run_id, "url": ex.flow_run_url}
    with stats.timed("ingest"):
        plan = ex.stage("ingest", plan_ingest, cfg)
        check_before_embedding(cfg, plan)  # k > N, empty targets, labels: refused before any embedding
        stats.counts.update(listing_counts(plan))  # unlistable folders: in run.json and the summary
        ex.log(f"ingest: {plan.n_samples} samples in {len(plan.shards)} shards from {cfg.source.kind}")
    embedder = None
    with stats.timed("embed"):
        if cfg.source.kind == "precomputed":
            store = ex.stage("ingest_precomputed", ingest_precomputed, cfg, plan, fan_out=ex.fan_out)
        else:
            embedder, store = ex.stage("prepare_embedder", _prepare_embedder, cfg, plan)
            # only new or changed samples are embedded, into new shards (pipeline.changes)
            increment, jobs = ex.stage("detect_changes", image_jobs, cfg, plan, store)
            ex.log(f"embed: {embedder.name}, dim {embedder.dim}; the store holds {len(store.shards())} live shards; "
                   + ", ".join(f"{k} {v}" for k, v in increment.counts.items()))
            calls = [
                # a worker process that shares no memory with this one rebuilds the embedder from the config and the store
                {"cfg": cfg, "source": plan.source, "store_root": store.root,
                 "embedder": embedder if ex.shares_memory else None, **job}
                for job in jobs
            ]
            status_counts: dict[str, int] = {}
            for counts in ex.fan_out(embed_shard, calls):
                for status, count in counts.items():
                    status_counts[status] = status_counts.get(status, 0) + count
            ex.stage("commit_increment", commit_increment, store, increment)
            stats.counts["embed_shards_skipped"] = status_counts.pop("skipped", 0) + len(increment.shards_before)
            del calls, jobs
        plan.release_refs()  # one object per sample, not needed past embedding: freed before scoring
    by_shard = None
    if cfg.incremental.mode == "append":  # only the new and the tombstoned shards are read (pipeline.append_shards)
        with stats.timed("score"):
            by_shard = ex.stage("append_by_shard", append_by_shard, cfg, store)
    if by_shard is not None:
        ex.log(f"index + score: append by shard: {by_shard.info['new_rows']} new rows in {len(by_shard.plan.new)} new "
               f"shards, {len(by_shard.plan.touched)} shards with removals, {by_shard.info['old_rows']} old rows")
        with stats.timed("manifest"):
            path, counts = ex.stage("write_manifest", write_append_manifest, cfg, store, by_shard, stats, fan_out=ex.fan_out)
            ex.log(f"manifest: {counts['samples']} rows, {counts['kept']} kept → {path}")
    else:
        _index_score_manifest(cfg, ex, store, embedder, stats)
    info = read_run_info(cfg.run_dir)
    info["timings_s"]["manifest"] = round(stats.timings["manifest"], 3)
    info["stage_spans"]["manifest"] = stats.spans["manifest"]
    if cfg.evaluate is not None:  # the selection against random, written into run.json (pipeline/evaluate.py)
        from pipeline.evaluate import evaluate_run, format_evaluation

        with stats.timed("evaluate"):
            info["evaluation"] = ex.stage("evaluate", evaluate_run, cfg.run_dir, cfg.evaluate)
        info["timings_s"]["evaluate"] = round(stats.timings["evaluate"], 3)
        ex.log(format_evaluation(info["evaluation"]))
    report_path = ex.stage("report", _report, cfg) if cfg.report else None
    ex.published(cfg, info, report_path)
    if cfg.export_uri:
        info["exported_to"] = ex.stage("export", export_run, cfg.run_dir, cfg.export_uri)
        ex.log(f"export: manifest, report and run.json copied to {info['exported_to']}")
    return info


def _index_score_manifest(cfg: CurateConfig, ex: Executor, store: EmbeddingStore, embedder: Any, stats: RunStats) -> None:
    """open rows → (targets) → index + score (recompute, or append over every row) → manifest."""
    stats.counts["store_status"] = store_status_counts(store)
    with stats.timed("index"):
        emb, rows = ex.stage("open_rows", _open_rows, store)
    targets: dict[str, Any] = {}
    if needs_targets(cfg):
        with stats.timed("embed_targets"):
            targets = ex.stage("embed_targets", embed_targets, cfg, embedder)
            ex.log(f"targets: { {k[:60]: len(getattr(v, 'emb', v)) for k, v in targets.items()} }")
    # index + score: k-means and every step (recompute), or the new rows against the previous version (append);
    # decide times both stages itself
    kmeans, columns, notes, record = decide(cfg, store, emb, rows, stats, targets, fan_out=ex.fan_out, stage=ex.stage)
    ex.log(f"index: {record['mode']}, spherical k-means k={kmeans.params.k} on {len(emb)} embeddings")
    with stats.timed("manifest"):  # one part per store shard, built and written by tasks; run.json last
        path, counts = ex.stage("write_manifest", write_curate_manifest, cfg, store, rows, kmeans, columns, notes, stats,
                                fan_out=ex.fan_out, incremental=record)
        ex.log(f"manifest: {counts['samples']} rows, {counts['kept']} kept → {path}")


def _prepare_embedder(cfg: CurateConfig, plan: IngestPlan) -> tuple[Any, EmbeddingStore]:
    store = EmbeddingStore(cfg.store_path)
    embedder = make_embedder(cfg, plan, store)
    return embedder, init_store(cfg, plan, embedder, embedder.dim)


def _open_rows(store: EmbeddingStore) -> tuple[Any, OkRows]:
    emb, rows = open_rows(store)
    if len(rows) == 0:
        raise ValueError("no sample could be decoded; nothing to index (see the store's meta for statuses)")
    return emb, rows


def _report(cfg: CurateConfig) -> Any:
    """report.html beside the manifest; the manifest is complete by now, so a failing report is logged, never fatal."""
    from pipeline.report import write_report

    try:
        return write_report(cfg.run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's result must not depend on its report
        log.warning("report: not written (%s: %s); the manifest is complete", type(exc).__name__, exc)
        return None
