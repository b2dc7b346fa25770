"""Append mode: decide only the rows that are new since the previous manifest version; earlier decisions stay.

A row is old when its uid is in the previous version (scored, not `missing`) and the store generation that added it
is not newer than the one the previous version was built from; every other live row is new (a changed file is a new
row under an old uid). Old rows keep their keep / weight / reason / dup_of / cluster / scores exactly. New rows:

1. assigned to the previous version's centroids (no refit). Drift statistic: the new rows' mean cosine distance to
   their centroid divided by the same mean over all rows when the centroids were fitted, minus 1. When it exceeds
   `incremental.drift_threshold` (default 0.25: new data sits 25% farther from the concepts than the fitted data did)
   or `incremental.refit` is set, the run falls back to recompute (a refit on the whole store) and says so.
2. `exact_dup`: a new row whose sha1 equals that of an earlier row (old rows first, then new rows in uid order) is
   dropped with dup_of = that row, old or new.
3. `semdedup`: inside each cluster holding new rows, a new row is dropped when it is within 1 − ε of any old row of the
   cluster (removed or not: the reference rule) or of a new row ranked before it (keep-hard: farther from the
   centroid first, ties by uid). ε is the step's `eps`, or the ε the previous version solved for its
   target_keep_fraction. Old rows are compared only where a bound says they can be within 1 − ε
   (scorers.cross_dedup.candidate_pairs: exact, never misses one), so a new row's score_semdedup counts old rows
   only within the threshold: for a row that duplicates no old row it is its largest similarity to an earlier new
   row of its cluster.
4. every other step runs on the new rows alone (its ScoringContext holds only them), so a keep_fraction is a fraction of
   the new rows; DBP's quotas per cluster come from the complexity the previous version stored for that cluster
   (score_dbp_cluster_complexity, measured over all the rows it saw), from the new rows only for a cluster without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

CENTROIDS_FILE = "centroids.npy"
_NOT_SCORED = ("missing", "bad_input")
_DECISIONS = ("uid", "keep", "weight", "cluster", "reason", "dup_of")  # what append carries from the previous version
# Old rows are read for cross-run SemDeDup in blocks of about this many bytes (as float32).
_READ_BYTES = 64 << 20


@dataclass
class Previous:
    version: int
    frame: pl.DataFrame  # the previous version's scored rows: uid, decision and score columns
    centroids: np.ndarray
    fit_mean_distance: float
    store_generation: int
    steps: list[dict[str, Any]]


def load_previous(run_dir: Path) -> Previous | None:
    """The latest version's decisions and centroids; None before the first version or when it lacks what append
    needs (a version written before append mode existed)."""
    from pipeline.manifest import read_run_info
    from pipeline.versions import carry_decisions, latest_version, version_dir

    version = latest_version(run_dir)
    if version is None or not (version_dir(run_dir, version) / CENTROIDS_FILE).exists():
        return None
    info = read_run_info(version_dir(run_dir, version))
    inc = info.get("incremental") or {}
    if "store_generation" not in inc or "fit_mean_distance" not in inc:
        return None
    frame = carry_decisions(run_dir, lambda c: c in _DECISIONS or c.startswith("score_"))
    assert frame is not None
    return Previous(
        version=version,
        frame=frame.filter(~pl.col("reason").fill_null("").is_in(_NOT_SCORED)),
        centroids=np.load(version_dir(run_dir, version) / CENTROIDS_FILE, allow_pickle=False),
        fit_mean_distance=float(inc["fit_mean_distance"]),
        store_generation=int(inc["store_generation"]),
        steps=list(info.get("steps", [])),
    )


@dataclass
class AppendResult:
    columns: dict[str, np.ndarray]  # run_steps' columns for every ok row, plus cluster and dup_of_uid
    notes: list[dict[str, Any]]
    centroids: np.ndarray
    info: dict[str, Any]


def new_rows_mask(meta: pl.DataFrame, previous: Previous) -> tuple[np.ndarray, pl.DataFrame]:
    """meta: uid and generation of the ok rows in row order. Returns (new mask, meta joined with the previous rows)."""
    joined = meta.with_row_index("_i").join(previous.frame, on="uid", how="left", suffix="_meta").sort("_i")
    old = joined["keep"].is_not_null() & (joined["generation"].fill_null(0) <= previous.store_generation)
    return ~old.to_numpy(), joined


def drift(similarity: np.ndarray, fit_mean_distance: float) -> float:
    """The new rows' mean cosine distance to their centroid over the fitted rows' mean, minus 1 (0 = no drift)."""
    if not len(similarity) or fit_mean_distance <= 0:
        return 0.0
    return float(np.mean(1.0 - similarity.astype(np.float64)) / fit_mean_distance - 1.0)


def append_decide(cfg: Any, store: Any, emb: Any, rows: Any, previous: Previous) -> AppendResult | None:
    """Decides the new rows (module docstring). Returns None when the drift statistic (or `refit`) asks for a refit;
    the caller then recomputes."""
    from pipeline.index import KMeansResult, nearest_centroid
    from pipeline.scoring import mean_one_over, run_steps
    from scorers.step import ScoringContext

    meta = store.all_meta(pl.col("status") == "ok", ["uid", "generation", "sha1"])
    n = meta.height
    is_new, joined = new_rows_mask(meta, previous)
    new_idx = np.flatnonzero(is_new)
    new_emb = np.asarray(emb[new_idx]) if len(new_idx) else np.empty((0, previous.centroids.shape[1]), np.float32)
    sim_new, cl_new = nearest_centroid(new_emb, previous.centroids, spherical=True) if len(new_idx) else (
        np.empty(0, np.float32), np.empty(0, np.int32))
    stat = drift(sim_new, previous.fit_mean_distance)
    info = {"mode": "append", "previous_version": previous.version, "old_rows": int(n - len(new_idx)),
            "new_rows": int(len(new_idx)), "drift": round(stat, 4), "drift_threshold": cfg.incremental.drift_threshold}
    if cfg.incremental.refit or stat > cfg.incremental.drift_threshold:
        return None

    cluster = joined["cluster"].fill_null(-1).cast(pl.Int32).to_numpy().copy()
    cluster[new_idx] = cl_new
    reason = np.asarray(joined["reason"].to_list(), dtype=object)
    reason[new_idx] = None
    weight = joined["weight"].fill_null(0.0).cast(pl.Float32).to_numpy().copy()
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_of_uid = np.asarray(joined["dup_of"].to_list(), dtype=object) if "dup_of" in joined.columns else np.full(n, None, object)
    dup_of_uid[new_idx] = None
    scores: dict[str, np.ndarray] = {c: joined[c].cast(pl.Float32).fill_null(np.nan).to_numpy().copy()
                                     for c in joined.columns if c.startswith("score_")}
    for values in scores.values():
        values[new_idx] = np.nan
    alive_new = np.ones(len(new_idx), dtype=bool)
    notes: list[dict[str, Any]] = []
    other_steps: list[tuple[str, dict[str, Any]]] = []
    uid_rank = rows.uid_rank
    for step in cfg.steps:
        name, knobs = step.scorer, step.knobs()
        if name == "exact_dup":
            first = _first_with_same_sha1(meta["sha1"], is_new, uid_rank)
            hit = alive_new & (first[new_idx] >= 0) & (first[new_idx] != new_idx)
            reason[new_idx[hit]] = "exact_dup"
            dup_of[new_idx[hit]] = first[new_idx[hit]]
            alive_new &= ~hit
            notes.append({"scorer": name, "knobs": knobs, "dropped": int(hit.sum()), "mode": "append"})
        elif name == "semdedup":
            eps = knobs.get("eps")
            if eps is None:
                eps = next((s.get("eps") for s in previous.steps if s.get("scorer") == "semdedup" and s.get("eps") is not None), None)
            if eps is None:
                raise ValueError("append mode: semdedup has no eps and the previous version recorded none; give semdedup an eps")
            hit, originals, max_sim = _semdedup_new(emb, cluster, is_new, new_idx, alive_new, sim_new, uid_rank,
                                                   previous.centroids, float(eps))
            reason[new_idx[hit]] = "semdedup"
            dup_of[new_idx[hit]] = originals[hit]
            alive_new &= ~hit
            col = scores.setdefault("score_semdedup", np.full(n, np.nan, np.float32))
            col[new_idx] = np.where(np.isfinite(max_sim), max_sim, np.nan)
            notes.append({"scorer": name, "knobs": knobs, "dropped": int(hit.sum()), "eps": float(eps), "mode": "append"})
        else:
            other_steps.append((name, knobs))
    new_weight = np.where(alive_new, 1.0, 0.0).astype(np.float32)
    if other_steps and alive_new.any():
        from pipeline.clustering import kmeans_params

        labels = rows.labels[new_idx] if rows.labels is not None else None
        ctx = ScoringContext(
            emb=emb.subset(new_idx) if hasattr(emb, "subset") else np.asarray(emb)[new_idx],
            uids=uid_rank[new_idx], labels=labels, sha1=meta["sha1"].to_numpy()[new_idx].astype(object),
            kmeans=KMeansResult(centroids=previous.centroids, assignment=cl_new, similarity=sim_new,
                                params=kmeans_params(cfg), used_gpu=False),
            alive=alive_new.copy(), n_scorable=int(len(new_idx)), seed=cfg.seed, device=cfg.embed.device,
            prior_complexity=stored_complexity(previous.frame, len(previous.centroids)),
        )
        columns, step_notes = run_steps(ctx, other_steps)
        dropped = columns["reason"] != None  # noqa: E711 - object array
        reason[new_idx[dropped]] = columns["reason"][dropped]
        has_dup = dropped & (columns["dup_of"] >= 0)
        dup_of[new_idx[has_dup]] = new_idx[columns["dup_of"][has_dup]]
        new_weight = columns["weight"]
        for name_, values in columns.items():
            if name_.startswith("score_"):
                scores.setdefault(name_, np.full(n, np.nan, np.float32))[new_idx] = values
        notes.extend({**note, "mode": "append"} for note in step_notes)
    elif len(new_idx):
        new_weight = mean_one_over(np.ones(len(new_idx)), alive_new)
    weight[new_idx] = np.where(alive_new, new_weight, 0.0)
    kept = np.array([r is None for r in reason], dtype=bool)
    for note in notes:
        note["alive_after"] = int(kept.sum())
    return AppendResult(
        columns={"reason": reason, "dup_of": dup_of, "dup_of_uid": dup_of_uid, "weight": weight.astype(np.float32),
                 "cluster": cluster, **scores},
        notes=notes, centroids=previous.centroids, info=info,
    )


def stored_complexity(frame: pl.DataFrame, k: int) -> np.ndarray | None:
    """DBP's per-cluster complexity as a version stored it (score_dbp_cluster_complexity: one value per cluster, on
    the rows DBP saw), NaN for clusters without it; None when the version ran no DBP."""
    column = "score_dbp_cluster_complexity"
    if column not in frame.columns:
        return None
    per = (frame.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan() & (pl.col("cluster") >= 0))
           .group_by("cluster").agg(pl.col(column).first()))
    out = np.full(k, np.nan)
    out[per["cluster"].to_numpy()] = per[column].to_numpy()
    return out


def _first_with_same_sha1(sha1: pl.Series, is_new: np.ndarray, uid_rank: np.ndarray) -> np.ndarray:
    """For every new row, and every row sharing a sha1 with one, the first row with that sha1 in the order (old before
    new, then uid); -1 for the other rows and without a sha1. Only the few rows whose hash a new row repeats are
    sorted and grouped, not the whole store."""
    frame = pl.DataFrame({"sha1": sha1, "new": is_new, "rank": uid_rank}).with_row_index("i")
    new_hashes = frame.filter(pl.col("new") & pl.col("sha1").is_not_null())["sha1"].unique()
    candidates = frame.filter(pl.col("sha1").is_in(new_hashes.implode()))
    first = candidates.sort("new", "rank").group_by("sha1", maintain_order=True).agg(pl.col("i").first().alias("first"))
    found = candidates.join(first, on="sha1", how="left")
    out = np.full(len(is_new), -1, dtype=np.int64)
    out[found["i"].to_numpy()] = found["first"].cast(pl.Int64).to_numpy()
    return out


def _semdedup_new(emb: Any, cluster: np.ndarray, is_new: np.ndarray, new_idx: np.ndarray, alive_new: np.ndarray,
                  sim_new: np.ndarray, uid_rank: np.ndarray, centroids: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-run SemDeDup of the alive new rows against the old rows of the clusters they land in. Returns (dropped,
    original row, max sim), each over the new rows. The old rows are read in store order, block by block (long
    sequential reads, not one read per row), and only those of clusters holding alive new rows; they are compared
    only where they can be within the threshold (scorers.cross_dedup.cross_semdedup_within, as pipeline.append_shards
    does: the same decisions and max_sim)."""
    from scorers.cross_dedup import candidate_pairs, cross_semdedup_within, project, projection

    m = len(new_idx)
    hit = np.zeros(m, dtype=bool)
    originals = np.full(m, -1, dtype=np.int64)
    max_sim = np.full(m, -np.inf, dtype=np.float32)
    members = np.flatnonzero(alive_new)
    # keep-hard rank inside each cluster: farther from the centroid first, ties by uid
    members = members[np.lexsort((uid_rank[new_idx[members]], sim_new[members]))]
    touched = np.unique(cluster[new_idx[members]])
    olds = np.flatnonzero(~is_new)
    olds = olds[np.isin(cluster[olds], touched)]
    step = max(1024, _READ_BYTES // (4 * max(1, int(centroids.shape[1]))))
    p = projection(int(centroids.shape[1]))
    old_proj = (np.concatenate([project(np.asarray(emb[olds[s:s + step]], dtype=np.float32), p) for s in range(0, len(olds), step)])
                if len(olds) else np.empty((0, len(p) + 1), np.float32))
    x = np.asarray(emb[new_idx[members]], dtype=np.float32)
    new_pos, old_pos = candidate_pairs(project(x, p), cluster[new_idx[members]], old_proj, cluster[olds], eps=eps)
    is_dup, arg, best = cross_semdedup_within(x, cluster[new_idx[members]], new_pos, old_pos, emb[olds[old_pos]], eps=eps)
    max_sim[members] = best
    hit[members] = is_dup
    orig = np.full(len(members), -1, dtype=np.int64)
    from_old, from_new = arg >= 0, arg <= -2
    orig[from_old] = olds[arg[from_old]]
    orig[from_new] = new_idx[members[-2 - arg[from_new]]]
    originals[members] = orig
    return hit, originals, max_sim


def decide(cfg: Any, store: Any, emb: Any, rows: Any, stats: Any, targets: dict[str, np.ndarray] | None = None,
           fan_out: Any = None, stage: Any = None) -> tuple[Any, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
    """The index and score stages of a run, by `incremental.mode`: recompute fits k-means on the whole store and runs
    every step (timed as "index" and "score"); append decides the new rows against the previous version
    (append_decide, timed as "score"), falling back to recompute without a usable previous version or on drift.
    `stage` (pipeline.sequence's Executor.stage) runs the k-means fit, the append decision and each step as named
    stages. Returns (k-means result with every row's cluster, columns, step notes, run.json's "incremental" record)."""
    from pipeline.clustering import fit_index, kmeans_params
    from pipeline.index import KMeansResult
    from pipeline.scoring import score

    previous = load_previous(cfg.run_dir) if cfg.incremental.mode == "append" else None
    record: dict[str, Any] = {"mode": cfg.incremental.mode}
    if cfg.incremental.mode == "append" and previous is None:
        record["fallback"] = "no earlier version with centroids: recomputed"
    if previous is not None:
        with stats.timed("score"):
            result = (stage("append_decide", append_decide, cfg, store, emb, rows, previous) if stage is not None
                      else append_decide(cfg, store, emb, rows, previous))
        if result is not None:
            columns = dict(result.columns)
            cluster = columns.pop("cluster")
            kmeans = KMeansResult(centroids=result.centroids, assignment=cluster, similarity=np.full(len(cluster), np.nan, np.float32),
                                  params=kmeans_params(cfg), used_gpu=False)
            record.update(result.info, fit_mean_distance=previous.fit_mean_distance)
            return kmeans, columns, result.notes, record
        record["fallback"] = "refit requested" if cfg.incremental.refit else "drift past the threshold: refitted and recomputed"
    with stats.timed("index"):
        kwargs = {"fan_out": fan_out} if fan_out is not None else {}
        kmeans = stage("fit_index", fit_index, cfg, store, emb, **kwargs) if stage is not None else fit_index(cfg, store, emb, **kwargs)
    with stats.timed("score"):
        columns, notes = score(cfg, store, emb, rows, kmeans, targets, fan_out=fan_out, stage=stage)
    record["fit_mean_distance"] = float(np.mean(1.0 - kmeans.similarity.astype(np.float64))) if len(kmeans.similarity) else 0.0
    return kmeans, columns, notes, record
