"""Append mode by store shard: an increment whose cost follows the new rows and the shards it touches, not the base.

pipeline.append decides the new rows with every live row of the store in hand (its uids ranked, its meta read and
joined with the whole previous manifest). This module reaches the same decisions, and writes the same manifest,
reading only:

- the new store shards (meta and embeddings) and the old shards tombstoned since the previous version (their meta and
  their previous manifest part);
- for every other old shard, nothing but its "rows file" and, for cross-run SemDeDup, its embeddings.

A rows file (`versions/N/rows/<shard>.arrow`, Arrow IPC, memory-mapped) holds, for one store shard's live ok rows at
version N in embedding-row order: uid, sha1, a 60-bit key of the sha1 (exact duplicates are matched on it, then on the
sha1 itself), meta_row, emb_row, the row's cluster and its projection (scorers.cross_dedup.project: 16 numbers and
a remainder) with which cross-run SemDeDup finds the old rows that can be within its threshold without reading the
others' embeddings. Every version writes one per live shard (an untouched shard's
is the previous version's, hard-linked, like its manifest part). Its schema metadata records the size, mtime and
inode of the shard's meta and embedding files it was made from: a shard written again or changed by hand no longer
matches, and the run takes pipeline.append's path, which reads and verifies every shard.

The same path is taken (`plan_append` returns None) when anything else is out of the ordinary: no usable previous
version or rows files, shards compacted or dropped since, old rows in a new shard, a step needing targets, a step
column the previous version lacks, labels only on old rows, or drift past the threshold.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from scorers.cross_dedup import PROJECTION_NAME

ROWS_DIR = "rows"
# The columns of a store shard's manifest part, besides the score columns.
SHARD_PART_COLUMNS = {"uid", "label", "location", "caption", "status", "keep", "weight", "cluster", "reason", "dup_of"}
_STAT_KEY = b"winnow.shard_files"
_FORMAT_KEY = b"winnow.rows_projection"


# ---- rows files ------------------------------------------------------------------------------------------------
def sha1_keys(sha1: pl.Series) -> np.ndarray:
    """A 60-bit integer key per sha1 string (its first 15 characters read as hex digits; the store's sha1 column holds
    hex digests or, for precomputed rows, decimal fingerprints: both parse); -1 where there is none. Equal strings
    have equal keys; different ones rarely do, and matches are confirmed on the string."""
    keys = sha1.str.slice(0, 15).str.to_integer(base=16, strict=False)
    return keys.fill_null(-1).cast(pl.Int64).to_numpy()


def _shard_stat(store: Any, shard: int) -> str:
    out = []
    for path in (store.meta_path(shard), store.emb_path(shard)):
        try:
            st = os.stat(path)
            out.append(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append("-")
    return ",".join(out)


def write_rows_file(path: Path, store: Any, shard: int, ok: pl.DataFrame, cluster: np.ndarray) -> None:
    """The rows file of one shard: `ok` = its live ok meta rows (uid, sha1, meta_row, emb_row) in embedding-row
    order, `cluster` their clusters; their projections (scorers.cross_dedup.project) are computed from the shard's
    embeddings."""
    import pyarrow as pa

    from scorers.cross_dedup import project, projection

    emb_rows = ok["emb_row"].cast(pl.Int64).to_numpy()
    emb = store.read_embeddings(shard)
    proj = project(np.asarray(emb[emb_rows], dtype=np.float32), projection(emb.shape[1]))
    table = pa.table({
        "uid": ok["uid"].to_arrow(), "sha1": ok["sha1"].to_arrow(),
        "key": pa.array(sha1_keys(ok["sha1"])), "meta_row": pa.array(ok["meta_row"].cast(pl.Int64).to_numpy()),
        "emb_row": pa.array(emb_rows), "cluster": pa.array(np.asarray(cluster, dtype=np.int32)),
        "proj": pa.FixedSizeListArray.from_arrays(pa.array(proj.reshape(-1)), proj.shape[1]),
    }).replace_schema_metadata({_STAT_KEY: _shard_stat(store, shard).encode(), _FORMAT_KEY: PROJECTION_NAME.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def rows_file_current(path: Path, store: Any, shard: int) -> bool:
    """Whether a rows file exists and was made from the shard's files as they are now (same inode, size, mtime)."""
    import pyarrow as pa

    if not path.exists():
        return False
    with pa.memory_map(str(path)) as source:
        meta = pa.ipc.open_file(source).schema.metadata or {}
    return meta.get(_STAT_KEY, b"").decode() == _shard_stat(store, shard) and meta.get(_FORMAT_KEY) == PROJECTION_NAME.encode()


def copy_rows_file(src: Path, dest: Path, shard: int, dead: np.ndarray | None) -> None:
    """A rows file less the rows tombstoned in `dead` (the store's codes), its recorded file stats kept."""
    import pyarrow as pa

    table = _read_rows_file(src)
    if dead is not None and len(dead):
        lo, hi = np.searchsorted(dead, [shard << 32, (shard + 1) << 32])
        gone = np.isin(table.column("meta_row").to_numpy(), dead[lo:hi] - (shard << 32))
        table = table.filter(pa.array(~gone))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, dest)


def _read_rows_file(path: Path) -> Any:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass
class AppendPlan:
    version: int
    folder: Path  # the previous version's folder
    info: dict[str, Any]  # its run.json
    centroids: np.ndarray
    old: list[int]  # live shards the previous version listed, in store order
    new: list[int]  # live shards added since, in store order
    touched: list[int]  # old shards with tombstones since
    parts: dict[str, str]  # previous version: shard → part name
    dead: np.ndarray
    live_rows: dict[int, int]  # live meta rows per live shard
    score_columns: list[str]  # the previous version's score columns


def plan_append(cfg: Any, store: Any) -> AppendPlan | None:
    """What an append by shard reads, or None when pipeline.append's path must run (module docstring)."""
    import pyarrow.parquet as pq

    from pipeline.append import CENTROIDS_FILE
    from pipeline.fill_store import needs_targets
    from pipeline.manifest import MANIFEST_FILE, PARTS_FILE, ManifestError, read_parts_index, read_run_info
    from pipeline.versions import latest_version, version_dir

    if cfg.incremental.mode != "append" or cfg.incremental.refit or needs_targets(cfg):
        return None
    version = latest_version(cfg.run_dir)
    if version is None:
        return None
    folder = version_dir(cfg.run_dir, version)
    try:
        info = read_run_info(folder)
        entries = {e["name"]: e["rows"] for e in read_parts_index(folder / MANIFEST_FILE)}
        names = pq.read_schema(folder / MANIFEST_FILE / PARTS_FILE).names
    except (ManifestError, OSError):
        return None
    inc = info.get("incremental") or {}
    parts = inc.get("parts")
    if (not parts or "store_generation" not in inc or "fit_mean_distance" not in inc
            or (info.get("store") or {}).get("path") != str(store.root) or not (folder / CENTROIDS_FILE).exists()):
        return None
    score_columns = sorted(c for c in names if c.startswith("score_"))
    if set(names) != SHARD_PART_COLUMNS | set(score_columns):
        return None
    live = store.shards()
    live_set = {int(s) for s in live}
    if any(int(k) not in live_set for k in parts):
        return None  # compacted or dropped since: the shards' rows moved
    dead = store.dead_codes()
    old = [s for s in live if str(s) in parts]
    new = [s for s in live if str(s) not in parts]
    live_rows, touched = {}, []
    for shard in live:
        if not store.is_done(shard):
            return None
        marker = store.read_marker(shard)
        if "rows" not in marker:
            return None
        lo, hi = np.searchsorted(dead, [shard << 32, (shard + 1) << 32])
        live_rows[shard] = int(marker["rows"]) - int(hi - lo)
        if str(shard) in parts:
            if parts[str(shard)] not in entries:
                return None
            if live_rows[shard] != entries[parts[str(shard)]]:
                touched.append(shard)
            if not rows_file_current(folder / ROWS_DIR / f"{shard:05d}.arrow", store, shard):
                return None  # none, or the shard's files changed since it was made: read and verify everything
    return AppendPlan(version=version, folder=folder, info=info,
                      centroids=np.load(folder / CENTROIDS_FILE, allow_pickle=False), old=old, new=new, touched=touched,
                      parts={str(k): v for k, v in parts.items()}, dead=dead, live_rows=live_rows, score_columns=score_columns)


def append_by_shard(cfg: Any, store: Any) -> AppendByShard | None:
    """The index and score stages of an append by shard (plan_append, then decide_by_shard); None when
    pipeline.append's path must run."""
    plan = plan_append(cfg, store)
    return None if plan is None else decide_by_shard(cfg, store, plan)


# ---- the decision ---------------------------------------------------------------------------------------------
@dataclass
class AppendByShard:
    plan: AppendPlan
    new_meta: dict[int, pl.DataFrame]  # new shard → its live meta rows
    columns: dict[int, dict[str, np.ndarray]]  # new shard → its ok rows' manifest columns (build_manifest_part's)
    new_cluster: np.ndarray
    notes: list[dict[str, Any]]
    info: dict[str, Any]
    touched_meta: dict[int, pl.DataFrame]
    new_uids: pl.Series


def decide_by_shard(cfg: Any, store: Any, plan: AppendPlan) -> AppendByShard | None:
    """The new rows decided as pipeline.append.append_decide decides them (same order, ties, blocks and values);
    None when pipeline.append's path must run."""
    from pipeline.append import drift, stored_complexity
    from pipeline.index import nearest_centroid
    from pipeline.rows import StoreRows
    from scorers.cross_dedup import candidate_pairs, cross_semdedup_within, project, projection

    inc = plan.info["incremental"]
    prev_generation = int(inc["store_generation"])
    info_store = store.info()
    new_meta = {s: store.live_meta(s) for s in plan.new}
    for meta in new_meta.values():
        if meta.height and int(meta["generation"].fill_null(0).min()) <= prev_generation:
            return None  # old rows in a new shard (compaction): their decisions are elsewhere
    oks = [new_meta[s].filter(pl.col("status") == "ok") for s in plan.new]
    ok_all = pl.concat(oks) if oks else pl.DataFrame(schema={"uid": pl.String, "sha1": pl.String, "label": pl.String})
    m = ok_all.height
    new_view = StoreRows.open([store.emb_path(s) for s in plan.new], dim=info_store.dim, dtype=info_store.dtype)
    starts = new_view.offsets[:-1]
    new_global = (np.concatenate([starts[i] + ok["emb_row"].to_numpy() for i, ok in enumerate(oks)]).astype(np.int64)
                  if oks else np.empty(0, np.int64))
    new_view = new_view.subset(new_global) if len(new_global) != len(new_view) else new_view
    new_emb = np.asarray(new_view[np.arange(m)]) if m else np.empty((0, plan.centroids.shape[1]), info_store.dtype)
    new_emb = new_emb.astype(np.float32)  # float16 → float32 is exact; numpy's cast spares importing torch
    sim_new, cl_new = nearest_centroid(new_emb, plan.centroids, spherical=True) if m else (
        np.empty(0, np.float32), np.empty(0, np.int32))
    stat = drift(sim_new, float(inc["fit_mean_distance"]))
    if stat > cfg.incremental.drift_threshold:
        return None
    old_rows = [_live_rows(plan, s) for s in plan.old]
    n_old = sum(len(t) for t in old_rows)
    info = {"mode": "append", "previous_version": plan.version, "old_rows": int(n_old), "new_rows": int(m),
            "drift": round(stat, 4), "drift_threshold": cfg.incremental.drift_threshold}
    new_uids = ok_all["uid"]
    rank = (new_uids.rank("ordinal").cast(pl.Int64) - 1).to_numpy()  # the relative order of pipeline.append's uid_rank
    new_sha1 = ok_all["sha1"]
    reason = np.full(m, None, dtype=object)
    dup_uid = np.full(m, None, dtype=object)
    dup_new = np.full(m, -1, dtype=np.int64)  # a duplicate of another new row (its position)
    scores: dict[str, np.ndarray] = {c: np.full(m, np.nan, np.float32) for c in plan.score_columns}
    alive = np.ones(m, dtype=bool)
    notes: list[dict[str, Any]] = []
    other_steps: list[tuple[str, dict[str, Any]]] = []
    for step in cfg.steps:
        name, knobs = step.scorer, step.knobs()
        if name == "exact_dup":
            first_old, first_new = _first_same_sha1(new_sha1, new_uids, old_rows)
            hit = alive & ((first_old != None) | ((first_new >= 0) & (first_new != np.arange(m))))  # noqa: E711
            reason[hit] = "exact_dup"
            from_old = hit & (first_old != None)  # noqa: E711
            dup_uid[from_old] = first_old[from_old]
            dup_new[hit & ~from_old] = first_new[hit & ~from_old]
            alive &= ~hit
            notes.append({"scorer": name, "knobs": knobs, "dropped": int(hit.sum()), "mode": "append"})
        elif name == "semdedup":
            eps = knobs.get("eps")
            if eps is None:
                eps = next((s.get("eps") for s in plan.info.get("steps", []) if s.get("scorer") == "semdedup"
                            and s.get("eps") is not None), None)
            if eps is None:
                return None  # pipeline.append's path raises the error
            members = np.flatnonzero(alive)
            members = members[np.lexsort((rank[members], sim_new[members]))]
            touched_clusters = np.zeros(len(plan.centroids), dtype=bool)
            touched_clusters[cl_new[members]] = True
            old_view = StoreRows.open([store.emb_path(s) for s in plan.old], dim=info_store.dim, dtype=info_store.dtype)
            picks = []  # per old shard: (rows-file positions, global embedding rows, clusters) of touched clusters
            for i, table in enumerate(old_rows):
                cluster = table.column("cluster").to_numpy()
                keep = np.flatnonzero((cluster >= 0) & touched_clusters[np.maximum(cluster, 0)])
                picks.append((keep, table.column("emb_row").to_numpy()[keep] + old_view.offsets[i], cluster[keep]))
            olds = np.concatenate([p[1] for p in picks]) if picks else np.empty(0, np.int64)
            old_cluster = np.concatenate([p[2] for p in picks]) if picks else np.empty(0, np.int32)
            width = len(projection(info_store.dim)) + 1
            old_proj = np.empty((len(olds), width), dtype=np.float32)
            at = 0
            for (keep, _, _), table in zip(picks, old_rows):
                values = table.column("proj").combine_chunks().flatten().to_numpy().reshape(-1, width)
                old_proj[at:at + len(keep)] = values if len(keep) == len(values) else values[keep]
                at += len(keep)
            # only old rows that can be within the threshold are read and compared (scorers.cross_dedup)
            x = new_emb[members]
            new_pos, old_pos = candidate_pairs(project(x, projection(info_store.dim)), cl_new[members], old_proj,
                                               old_cluster, eps=float(eps))
            del old_proj
            is_dup, arg, best = cross_semdedup_within(x, cl_new[members], new_pos, old_pos, old_view[olds[old_pos]],
                                                      eps=float(eps))
            max_sim = np.full(m, -np.inf, dtype=np.float32)
            max_sim[members] = best
            hit = np.zeros(m, dtype=bool)
            hit[members] = is_dup
            from_old, from_new = arg >= 0, arg <= -2
            if from_old.any():
                bounds = np.cumsum([0, *(len(p[0]) for p in picks)])
                which = np.searchsorted(bounds, arg[from_old], side="right") - 1
                local = arg[from_old] - bounds[which]
                dup_uid[members[from_old]] = [old_rows[w].column("uid")[int(picks[w][0][loc])].as_py()
                                              for w, loc in zip(which.tolist(), local.tolist())]
            dup_new[members[from_new]] = members[-2 - arg[from_new]]
            reason[hit] = "semdedup"
            alive &= ~hit
            scores.setdefault("score_semdedup", np.full(m, np.nan, np.float32))
            scores["score_semdedup"] = np.where(np.isfinite(max_sim), max_sim, np.nan).astype(np.float32)
            notes.append({"scorer": name, "knobs": knobs, "dropped": int(hit.sum()), "eps": float(eps), "mode": "append"})
        else:
            other_steps.append((name, knobs))
    weight = np.where(alive, 1.0, 0.0).astype(np.float32)
    if other_steps and alive.any():
        from pipeline.clustering import kmeans_params
        from pipeline.index import KMeansResult
        from pipeline.scoring import run_steps
        from scorers.step import ScoringContext

        label_col = ok_all["label"]
        if label_col.null_count() == len(label_col):
            return None  # pipeline.append passes all-null labels when old rows have some: take its path
        from pipeline.ok_rows import shared_strings

        prior = None
        if "score_dbp_cluster_complexity" in plan.score_columns:
            from pipeline.manifest import MANIFEST_FILE, manifest_parts

            frame = pl.read_parquet([str(p) for p in manifest_parts(plan.folder / MANIFEST_FILE)],
                                    columns=["cluster", "reason", "score_dbp_cluster_complexity"])
            prior = stored_complexity(frame.filter(~pl.col("reason").fill_null("").is_in(["missing", "bad_input"])),
                                      len(plan.centroids))
        ctx = ScoringContext(
            emb=new_view, uids=rank, labels=shared_strings(label_col), sha1=new_sha1.to_numpy().astype(object),
            kmeans=KMeansResult(centroids=plan.centroids, assignment=cl_new, similarity=sim_new,
                                params=kmeans_params(cfg), used_gpu=False),
            alive=alive.copy(), n_scorable=int(m), seed=cfg.seed, device=cfg.embed.device, prior_complexity=prior,
        )
        columns, step_notes = run_steps(ctx, other_steps)
        dropped = columns["reason"] != None  # noqa: E711 - object array
        reason[dropped] = columns["reason"][dropped]
        has_dup = dropped & (columns["dup_of"] >= 0)
        dup_new[has_dup] = columns["dup_of"][has_dup]
        weight = columns["weight"]
        for name_, values in columns.items():
            if name_.startswith("score_"):
                if name_ not in plan.score_columns:
                    return None  # a column the earlier parts lack: every part changes
                scores[name_] = np.asarray(values, dtype=np.float32)
        notes.extend({**note, "mode": "append"} for note in step_notes)
    elif m:
        from scorers.arrays import mean_one_over  # not pipeline.scoring's import: it would import torch

        weight = mean_one_over(np.ones(m), alive)
    if set(scores) - set(plan.score_columns):
        return None
    weight = np.where(alive, weight, 0.0).astype(np.float32)
    has = dup_new >= 0
    if has.any():
        dup_uid[has] = new_uids.gather(dup_new[has]).to_list()
    columns_by_shard: dict[int, dict[str, np.ndarray]] = {}
    start = 0
    for shard, ok in zip(plan.new, oks):
        stop = start + ok.height
        columns_by_shard[shard] = {
            "reason": reason[start:stop], "dup_of": np.full(stop - start, -1, np.int64), "dup_of_uid": dup_uid[start:stop],
            "weight": weight[start:stop], "cluster": cl_new[start:stop].astype(np.int32),
            **{c: v[start:stop] for c, v in scores.items()},
        }
        start = stop
    touched_meta = {s: store.live_meta(s) for s in plan.touched}
    return AppendByShard(plan=plan, new_meta=new_meta, columns=columns_by_shard, new_cluster=cl_new, notes=notes,
                         info=info, touched_meta=touched_meta, new_uids=new_uids)


def _live_rows(plan: AppendPlan, shard: int) -> Any:
    """The old shard's rows file, less the rows tombstoned since."""
    import pyarrow as pa

    table = _read_rows_file(plan.folder / ROWS_DIR / f"{shard:05d}.arrow")
    lo, hi = np.searchsorted(plan.dead, [shard << 32, (shard + 1) << 32])
    if hi > lo:
        gone = np.isin(table.column("meta_row").to_numpy(), plan.dead[lo:hi] - (shard << 32))
        if gone.any():
            table = table.filter(pa.array(~gone))
    return table


def _first_same_sha1(new_sha1: pl.Series, new_uids: pl.Series, old_rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """For every new row, the first row with its sha1 in pipeline.append's order (old rows before new, then uid):
    (that old row's uid or None, that new row's position or -1). Old rows are matched on the sha1 key, then the sha1."""
    m = len(new_sha1)
    keys = sha1_keys(new_sha1)
    wanted = np.unique(keys[keys >= 0])
    olds = []
    for table in old_rows:
        old_keys = table.column("key").to_numpy()
        at = np.minimum(np.searchsorted(wanted, old_keys), max(len(wanted) - 1, 0))
        hit = np.flatnonzero(wanted[at] == old_keys) if len(wanted) else np.empty(0, np.int64)
        if len(hit):
            olds.append(table.select(["uid", "sha1"]).take(hit))
    new = pl.DataFrame({"uid": new_uids, "sha1": new_sha1, "pos": np.arange(m, dtype=np.int64)}).filter(pl.col("sha1").is_not_null())
    import pyarrow as pa

    old = (pl.from_arrow(pa.concat_tables(olds)) if olds else pl.DataFrame(schema={"uid": pl.String, "sha1": pl.String})).filter(
        pl.col("sha1").is_in(new["sha1"].implode()))
    first_old = old.sort("uid").group_by("sha1", maintain_order=True).agg(pl.col("uid").first().alias("first_old"))
    first_new = new.sort("uid").group_by("sha1", maintain_order=True).agg(pl.col("pos").first().alias("first_new"))
    found = new.join(first_old, on="sha1", how="left").join(first_new, on="sha1", how="left")
    out_old = np.full(m, None, dtype=object)
    out_new = np.full(m, -1, dtype=np.int64)
    pos = found["pos"].to_numpy()
    out_old[pos] = np.asarray(found["first_old"].to_list(), dtype=object)
    out_new[pos] = found["first_new"].to_numpy()
    return out_old, out_new
