"""The curate stages in order, in this process: ingest → embed → index → score → manifest.

Each stage is a plain function in its own module (nothing there imports Prefect, so they can be called and tested
on their own): pipeline.ingest (the plan), pipeline.fill_store (embedder, embedding and precomputed copy, targets),
pipeline.ok_rows (the rows the scorers see), pipeline.clustering (k-means), pipeline.scoring (the steps),
pipeline.run_record (manifest and run.json). flows/curate.py wraps them in Prefect tasks.
"""
from __future__ import annotations

from typing import Any

from pipeline.clustering import fit_index
from pipeline.config import CurateConfig
from pipeline.fill_store import embed_shard, embed_targets, ingest_precomputed, init_store, make_embedder, needs_targets
from pipeline.ingest import listing_counts, plan_ingest
from pipeline.ok_rows import open_rows
from pipeline.run_record import RunStats, store_status_counts, write_curate_manifest
from pipeline.scoring import score
from pipeline.store import EmbeddingStore


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
        stats.counts.update(listing_counts(plan))
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
    if needs_targets(cfg):
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
