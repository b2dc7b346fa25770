"""The score stage: the configured steps (scorers/step.py's registry) run in order over the store's ok rows."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from pipeline.config import CurateConfig
from pipeline.evaluate import auto_rule
from pipeline.fanout import FanOut
from pipeline.faults import failpoint
from pipeline.fill_store import worker_embedder
from pipeline.ok_rows import OkRows
from pipeline.text_embed import cached_text_embeddings
from pipeline.sources import TableSource, source_from_config
from pipeline.text_source import align_by_uid, unit_rows
from pipeline.index import KMeansResult, KnnParams, build_knn_index
from pipeline.store import EmbeddingStore
from scorers.arrays import mean_one_over  # noqa: F401 - also imported from here (pipeline.append)
from scorers.step import EvalSet, ScoringContext, needing, registry, validate_steps


def score(
    cfg: CurateConfig,
    store: EmbeddingStore,
    emb: Any,
    rows: OkRows,
    kmeans: KMeansResult,
    targets: dict[str, np.ndarray] | None = None,
    fan_out: FanOut | None = None,
    stage: Stage | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Runs the configured steps over the ok rows; returns run_steps' per-row columns and one note per step.

    `stage` runs each step as a named stage (`score_<scorer>`: a Prefect task in the flow); by default, a plain call.
    """
    targets = targets or {}

    def meta(names: list[str]) -> dict[str, np.ndarray]:
        frame = store.all_meta(pl.col("status") == "ok", names)  # shard order = the rows' order (open_rows)
        return {c: frame[c].to_numpy() for c in names}

    embedder = store.info().embedder

    def text_encoder(texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        # the store's embedder is rebuilt only on a cache miss; the text cache sits beside the store
        return cached_text_embeddings(store.root / "text", embedder, texts,
                                      lambda: worker_embedder(cfg, store.root), batch_size=batch_size)

    steps = [(s.scorer, s.knobs()) for s in cfg.steps]

    def ok_meta(column: str) -> np.ndarray | None:  # read only when a step needs it
        if not needing(column if column != "caption" else "captions", steps):
            return None
        return store.all_meta(pl.col("status") == "ok", [column])[column].to_numpy().astype(object)

    ctx = ScoringContext(
        emb=emb,
        uids=rows.uid_rank,
        labels=rows.labels,
        sha1=ok_meta("sha1"),
        kmeans=kmeans,
        alive=np.ones(len(rows), dtype=bool),
        n_scorable=len(rows),
        seed=cfg.seed,
        device=cfg.embed.device,
        targets={k: v for k, v in targets.items() if not isinstance(v, EvalSet)},
        eval_sets={k.removeprefix("eval:"): v for k, v in targets.items() if isinstance(v, EvalSet)},
        meta=meta,
        text_encoder=text_encoder if embedder.get("kind") == "clip" else None,  # pixels/precomputed: no text tower
        source_text=lambda: shipped_text(cfg, store),
        embedder=embedder,
        fan_out=fan_out,
        cluster_batches=cfg.runner.cluster_batches or 4 * cfg.runner.workers,
        cache_dir=store.root / "index" / f"auto-{store.fingerprint()}",
        captions=ok_meta("caption"),
        knn_index=lambda x, seed: build_knn_index(x, KnnParams(seed=seed)),  # exact below 200k rows, IVF above
    )
    return run_steps(ctx, steps, stage=stage)


def shipped_text(cfg: CurateConfig, store: EmbeddingStore) -> np.ndarray | None:
    """The caption embeddings the source ships, one unit row per ok row (zero = no caption), or None: a precomputed
    source's (copied into the store when it was filled), else a table's text_embedding_column matched by uid."""
    text = store.load_text()
    if text is not None or cfg.source.kind != "table":
        return text
    source = source_from_config(cfg.source.arguments())
    if not isinstance(source, TableSource) or source.text_embedding_column is None:
        return None
    uids, emb = source.text_embedding_table()
    ok_uids = store.all_meta(pl.col("status") == "ok", ["uid"])["uid"].to_list()
    return unit_rows(align_by_uid(ok_uids, uids, emb, what=f"table {source.path!r} column {source.text_embedding_column!r}"))


# Runs fn(*args, **kwargs) as a named stage (pipeline.sequence's Executor.stage): a Prefect task in the flow.
Stage = Callable[..., Any]


def run_steps(
    ctx: ScoringContext, steps: list[tuple[str, dict[str, Any]]], *, stage: Stage | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Applies steps in order. Returns the manifest columns for scored rows and one note per step.

    Columns: reason (None where kept), dup_of (row index or -1), weight (mean 1 over the kept rows, 0 elsewhere;
    from the last reweighting step, else uniform) and every score column. Each step writes only the score columns
    it declares, NaN only where it declares them nullable, and drops rows only when it has a reason.
    """
    validate_steps(steps)
    if ctx.choose_rule is None:
        ctx.choose_rule = auto_rule
    specs = registry()
    n = len(ctx.uids)
    reason = np.full(n, None, dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    weights = np.ones(n, dtype=np.float64)
    scores: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    notes: list[dict[str, Any]] = []
    for position, (name, knobs) in enumerate(steps):
        spec = specs[name]
        if "labels" in spec.needs and ctx.labels is None:
            raise ValueError(f"{name} needs labels; the source has none (image_folder class subfolders, or a label column)")
        failpoint("score_step")
        try:
            out = stage(f"score_{name}", spec.fn, ctx, **knobs) if stage is not None else spec.fn(ctx, **knobs)
        except ValueError as exc:  # what the data made impossible (a budget, a missing column): say which step and what came before
            raise ValueError(f"step {position} ({name}): {exc}{_what_earlier_steps_left(notes, n)}") from exc
        declared = spec.score_columns(knobs)
        for col, values in out.scores.items():
            if col not in declared:
                raise ValueError(f"step {name} wrote the undeclared score column {col}; declared: {sorted(declared)}")
            if col in scores:
                raise ValueError(f"two steps write the column {col}")
            scores[col] = np.asarray(values, dtype=np.float32)
            if not declared[col].nullable and np.isnan(scores[col]).any():
                raise ValueError(f"step {name} wrote NaN into {col}, which it declares never null")
        if out.weights is not None:
            weights = np.asarray(out.weights, dtype=np.float64)
        dropped = 0
        if out.drop is not None:
            drop = out.drop & ctx.alive
            if drop.any() and spec.reason is None:
                raise ValueError(f"step {name} dropped rows but declares no reason")
            reason[drop] = spec.reason
            if out.dup_of is not None:
                dup_of[drop] = out.dup_of[drop]
            for col, values in out.text.items():
                # a later step's value never overwrites an earlier one's (only rows this step drops are written)
                key = "dup_of_uid" if col == "dup_of" else col
                column = text.setdefault(key, np.full(n, None, dtype=object))
                column[drop] = np.asarray(values, dtype=object)[drop]
            ctx.alive = ctx.alive & ~drop
            dropped = int(drop.sum())
        notes.append(
            {"scorer": name, "knobs": knobs, "dropped": dropped, "alive_after": int(ctx.alive.sum()), "orientation": spec.orientation, **out.info}
        )
    return {"reason": reason, "dup_of": dup_of, "weight": mean_one_over(weights, ctx.alive), **scores, **text}, notes


def _what_earlier_steps_left(notes: list[dict[str, Any]], n: int) -> str:
    if not notes:
        return ""
    dropped = ", ".join(f"step {i} ({note['scorer']}) dropped {note['dropped']:,}" for i, note in enumerate(notes))
    return f" (of {n:,} rows: {dropped}; {notes[-1]['alive_after']:,} left)"


