"""The run's record: the manifest (one part per store shard, from its meta and the scored columns) and run.json."""
from __future__ import annotations

import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.config import CurateConfig
from pipeline.fanout import FanOut
from pipeline.index import KMeansResult
from pipeline.ok_rows import OkRows, uids_at
from pipeline.append_shards import ROWS_DIR, SHARD_PART_COLUMNS, copy_rows_file
from pipeline.store import EmbeddingStore
from scorers.step import registry


@dataclass
class RunStats:
    """Counts and timings collected across stages for run.json and the summary."""

    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, list[float]] = field(default_factory=dict)  # stage → [first start, last end], Unix time

    running: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage → (perf_counter, Unix time) at start
    flow_run: dict[str, Any] | None = None  # {"id", "url"} of the Prefect flow run doing the work (None outside Prefect)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to stage `name` and stretches its span."""
        start, wall_start = time.perf_counter(), time.time()
        self.running[name] = (start, wall_start)
        yield
        del self.running[name]
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.spans[name] = [self.spans.get(name, [wall_start])[0], time.time()]

    def timings_now(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(timings, spans) including the time so far of stages still running: run.json is written inside the
        manifest stage, and carries that stage's time up to its own writing."""
        timings, spans = dict(self.timings), dict(self.spans)
        for name, (start, wall_start) in self.running.items():
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            spans[name] = [spans.get(name, [wall_start])[0], time.time()]
        return timings, spans


def write_curate_manifest(
    cfg: CurateConfig,
    store: EmbeddingStore,
    rows: OkRows,
    kmeans: KMeansResult,
    columns: dict[str, np.ndarray],
    notes: list[dict[str, Any]],
    stats: RunStats,
    fan_out: FanOut | None = None,
    incremental: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, int]]:
    """The run's manifest as the run directory's next version (pipeline.versions): one part per store shard, each
    built by a task from its shard's live meta and its slice of the scored columns, plus one part for the previous
    version's rows whose samples are gone (reason `missing`); run.json, the centroids and changes.parquet beside them.
    Returns the manifest path (<run>/manifest.parquet, the latest version) and the counts written to run.json."""
    from pipeline.manifest import MANIFEST_FILE

    previous = previous_run_record(cfg.run_dir)
    missing = missing_rows(cfg.run_dir, store)
    counts = manifest_counts(columns["reason"], n_bad=rows.bad_rows, n_missing=missing.height)
    record = dict(incremental or {"mode": cfg.incremental.mode})
    record["store_generation"] = store.generation()
    changes = store.changes_since(int(previous.get("store_generation", 0)))
    changes["unchanged"] = len(rows) + rows.bad_rows - changes["new"] - changes["changed"]
    record["source_changes"] = changes
    stats.counts["source_changes"] = changes
    cluster = kmeans.assignment.astype(np.int32)
    reusable = reusable_parts(cfg.run_dir, store, record, columns)
    record["parts"] = {str(shard): _part_name(position) for position, shard in enumerate(rows.shards)}
    record["parts_linked"] = len(reusable)
    calls = []
    for position, shard in enumerate(rows.shards):
        if shard in reusable:  # append mode: an untouched shard's rows and decisions are the previous version's
            calls.append({"store_root": store.root, "shard": shard, "columns": {}, "uid_file": None, "index": position,
                          "reuse": str(reusable[shard])})
            continue
        start, stop = rows.bounds(position)
        part_columns = {name: values[start:stop] for name, values in columns.items()}
        calls.append({"store_root": store.root, "shard": shard, "columns": {**part_columns, "cluster": cluster[start:stop]},
                      "uid_file": rows.uid_file, "index": position})
    if missing.height:
        scores = sorted(c for c in columns if c.startswith("score_"))
        calls.append({"store_root": None, "shard": -1, "columns": {}, "uid_file": None, "index": len(calls),
                      "missing": missing, "score_columns": scores})

    _publish_version(cfg, store, counts, notes, stats, record, calls, kmeans.centroids, fan_out)
    return cfg.run_dir / MANIFEST_FILE, counts


def write_append_manifest(cfg: CurateConfig, store: EmbeddingStore, result: Any, stats: RunStats,
                          fan_out: FanOut | None = None) -> tuple[Path, dict[str, Any]]:
    """write_curate_manifest's version for an append by shard (pipeline.append_shards): untouched shards' parts and
    rows files linked, tombstoned shards' parts filtered from the previous version's, new shards' parts built, the
    `missing` part from the tombstoned shards' gone rows; counts and statuses from the previous run.json updated by
    what changed. Returns what write_curate_manifest returns, with the same content."""
    from pipeline.manifest import MANIFEST_FILE

    plan = result.plan
    prev_info = plan.info
    prev_counts = prev_info.get("counts") or {}
    by_reason: Counter[str] = Counter({k: int(v) for k, v in (prev_counts.get("by_reason") or {}).items() if k != "missing"})
    status: Counter[str] = Counter({k: int(v) for k, v in (prev_counts.get("store_status") or {}).items()})

    def reasons(frame: pl.DataFrame) -> Counter[str]:
        return Counter({("kept" if r is None else str(r)): int(n) for r, n in frame.group_by("reason").len().iter_rows()})

    kept_parts, gone = {}, []
    for shard in plan.touched:
        part = pl.read_parquet(plan.folder / MANIFEST_FILE / plan.parts[str(shard)])
        is_live = pl.col("uid").is_in(result.touched_meta[shard]["uid"].implode())
        kept_parts[shard] = part.filter(is_live)
        lost = part.filter(~is_live)
        by_reason -= reasons(part)
        by_reason += reasons(kept_parts[shard])
        status.subtract(Counter({str(k): int(n) for k, n in lost.group_by("status").len().iter_rows()}))
        gone.append(lost.select("uid", "label", "location", "caption"))
    missing = (pl.concat(gone) if gone else pl.DataFrame(schema={"uid": pl.String, "label": pl.String, "location": pl.String,
                                                                   "caption": pl.String}))
    missing = missing.filter(~pl.col("uid").is_in(result.new_uids.implode())).sort("uid")
    n_bad_new = 0
    for shard in plan.new:
        meta = result.new_meta[shard]
        status.update({str(k): int(n) for k, n in meta.group_by("status").len().iter_rows()})
        n_bad_new += meta.height - len(result.columns[shard]["reason"])
        by_reason.update("kept" if r is None else str(r) for r in result.columns[shard]["reason"].tolist())
    if n_bad_new:
        by_reason["bad_input"] += n_bad_new
    if missing.height:
        by_reason["missing"] += missing.height
    by_reason_sorted = {k: v for k, v in sorted(by_reason.items()) if v}
    counts = {"samples": sum(by_reason_sorted.values()), "kept": by_reason_sorted.get("kept", 0), "by_reason": by_reason_sorted}
    stats.counts["store_status"] = {k: v for k, v in sorted(status.items()) if v}
    notes = [{**note, "alive_after": counts["kept"]} for note in result.notes]

    record: dict[str, Any] = {"mode": cfg.incremental.mode, **result.info,
                              "fit_mean_distance": float(prev_info["incremental"]["fit_mean_distance"])}
    record["store_generation"] = store.generation()
    changes = store.changes_since(int(prev_info["incremental"].get("store_generation", 0)))
    changes["unchanged"] = sum(plan.live_rows.values()) - changes["new"] - changes["changed"]
    record["source_changes"] = changes
    stats.counts["source_changes"] = changes
    shards = store.shards()
    record["parts"] = {str(shard): _part_name(position) for position, shard in enumerate(shards)}
    record["parts_linked"] = len(plan.old) - len(plan.touched)
    previous_parts = plan.folder / MANIFEST_FILE
    calls: list[dict[str, Any]] = []
    for position, shard in enumerate(shards):
        call: dict[str, Any] = {"store_root": store.root, "shard": shard, "columns": {}, "uid_file": None, "index": position}
        if shard in result.columns:
            call["columns"] = result.columns[shard]
        elif shard in kept_parts:
            call.update(frame=kept_parts[shard], rows_from=plan.folder / ROWS_DIR / f"{shard:05d}.arrow", dead=plan.dead)
        else:  # plan_append checked its rows file
            call.update(reuse=str(previous_parts / plan.parts[str(shard)]), rows_current=True)
        calls.append(call)
    if missing.height:
        calls.append({"store_root": None, "shard": -1, "columns": {}, "uid_file": None, "index": len(calls),
                      "missing": missing, "score_columns": list(plan.score_columns)})

    _publish_version(cfg, store, counts, notes, stats, record, calls, plan.centroids, fan_out)
    return cfg.run_dir / MANIFEST_FILE, counts



def _publish_version(cfg: CurateConfig, store: EmbeddingStore, counts: dict[str, Any], notes: list[dict[str, Any]], stats: RunStats,
                     record: dict[str, Any], calls: list[dict[str, Any]], centroids: Any, fan_out: FanOut | None) -> None:
    """Writes the manifest parts (each store shard's with its rows file), run.json and the centroids into a new
    version folder and publishes it."""
    from pipeline.append import CENTROIDS_FILE
    from pipeline.manifest import commit_manifest
    from pipeline.versions import publish

    def write(folder: Path, version: int) -> None:
        # run.json is made once the parts are written, so it holds the manifest stage's time up to its own writing
        def info() -> dict[str, Any]:
            return {**run_info(cfg, store, counts, notes, stats), "incremental": record, "version": version}

        with_rows = [c if c["shard"] < 0 else {**c, "rows_path": folder / ROWS_DIR / f"{c['shard']:05d}.arrow"} for c in calls]
        commit_manifest(folder, info, build_manifest_part, with_rows, fan_out=fan_out)
        np.save(folder / CENTROIDS_FILE, np.asarray(centroids, dtype=np.float32))

    publish(cfg.run_dir, write)


def _part_name(position: int) -> str:
    return f"part-{position:05d}.parquet"  # commit_manifest's name for the call with this index




def reusable_parts(run_dir: Path, store: EmbeddingStore, record: dict[str, Any], columns: dict[str, np.ndarray]) -> dict[int, Path]:
    """Store shards whose manifest part in this append run would be byte for byte the previous version's part, and
    that part's file. Append mode keeps every old row's decision, and a committed shard never changes except by
    tombstones (new and changed samples go to new shards); so a shard the previous version listed, read from the
    same store, with as many live rows as that part holds (no tombstone since), under the same columns, gives the
    same rows. Only an append decision (not a fallback) qualifies."""
    import pyarrow.parquet as pq

    from pipeline.manifest import MANIFEST_FILE, PARTS_FILE, read_parts_index, read_run_info
    from pipeline.versions import version_dir

    if record.get("mode") != "append" or "old_rows" not in record or record.get("previous_version") is None:
        return {}
    folder = version_dir(run_dir, int(record["previous_version"])) / MANIFEST_FILE
    info = read_run_info(version_dir(run_dir, int(record["previous_version"])))
    parts = (info.get("incremental") or {}).get("parts")
    if not parts or (info.get("store") or {}).get("path") != str(store.root):
        return {}
    expected = SHARD_PART_COLUMNS | {c for c in columns if c.startswith("score_")}
    if set(pq.read_schema(folder / PARTS_FILE).names) != expected:
        return {}
    rows_in = {e["name"]: e["rows"] for e in read_parts_index(folder)}
    dead = store.dead_codes()
    out = {}
    for shard in store.shards():
        name = parts.get(str(shard))
        if name in rows_in and store.live_meta(shard, dead=dead).height == rows_in[name]:
            out[shard] = folder / name
    return out


def previous_run_record(run_dir: Path) -> dict[str, Any]:
    """The latest published version's run.json "incremental" record ({} before the first version)."""
    from pipeline.manifest import read_run_info
    from pipeline.versions import latest_version, version_dir

    version = latest_version(run_dir)
    if version is None:
        return {}
    return dict(read_run_info(version_dir(run_dir, version)).get("incremental") or {})


def missing_rows(run_dir: Path, store: EmbeddingStore) -> pl.DataFrame:
    """The latest version's rows (uid, label, location, caption) whose sample the store no longer holds live: the
    source lost them. Rows already `missing` there are not carried again."""
    from pipeline.versions import carry_decisions, migrate_legacy

    migrate_legacy(run_dir)
    before = carry_decisions(run_dir, lambda c: c in ("uid", "label", "location", "caption", "reason"))
    if before is None:
        return pl.DataFrame(schema={"uid": pl.String})
    before = before.filter(pl.col("reason").fill_null("") != "missing").drop("reason")
    live = store.all_meta(columns=["uid"])
    return before.join(live, on="uid", how="anti").sort("uid")


def build_manifest_part(store_root: str | Path | None, shard: int, columns: dict[str, np.ndarray], uid_file: Path | None, path: Path,
                        missing: pl.DataFrame | None = None, score_columns: list[str] | None = None, reuse: str | None = None,
                        rows_path: Path | None = None, frame: pl.DataFrame | None = None, rows_from: Path | None = None,
                        dead: np.ndarray | None = None, rows_current: bool = False) -> int:
    """One store shard's manifest rows, sorted by uid: its live ok rows with their scored columns (dup_of row numbers
    named by uid), its live unusable rows as reason bad_input. With `missing` (shard -1): those rows, reason
    `missing`, with the same columns as the shard parts. Validated and written to `path`; returns the rows.
    With `reuse` (reusable_parts): the previous version's identical part, hard-linked (published versions are never
    modified, so both versions may share the file), copied where links are not possible.
    `rows_path`: also write the shard's rows file there (pipeline.append_shards). With `frame` (append by shard, a
    shard tombstoned since): that part, already built, and the rows file `rows_from` less the rows in `dead`.
    `rows_current`: the previous rows file was checked against the shard's files already (pipeline.append_shards)."""
    from pipeline.append_shards import link_or_copy, rows_file_current, write_rows_file
    from pipeline.manifest import conform, validate, write_part

    if reuse is not None:
        import pyarrow.parquet as pq

        link_or_copy(Path(reuse), path)
        if rows_path is not None:  # the shard's rows file: the previous version's, or made once from its part
            previous_rows = Path(reuse).parent.parent / ROWS_DIR / f"{shard:05d}.arrow"
            store = EmbeddingStore(store_root)
            if rows_current or rows_file_current(previous_rows, store, shard):
                link_or_copy(previous_rows, rows_path)
            else:
                ok = store.live_meta(shard).filter(pl.col("status") == "ok").with_row_index("_i")
                clusters = ok.select("uid", "_i").join(pl.read_parquet(reuse, columns=["uid", "cluster"]), on="uid", how="left").sort("_i")
                write_rows_file(rows_path, store, shard, ok, clusters["cluster"].fill_null(-1).to_numpy())
        return pq.ParquetFile(path).metadata.num_rows
    if frame is not None:
        if rows_path is not None and rows_from is not None:
            copy_rows_file(rows_from, rows_path, shard, dead)
        part = conform(frame)
        validate(part)
        return write_part(part, path)
    if missing is not None:
        part = missing.with_columns(
            pl.lit(False).alias("keep"), pl.lit(0.0, dtype=pl.Float32).alias("weight"), pl.lit(-1, dtype=pl.Int32).alias("cluster"),
            pl.lit("missing").alias("reason"), pl.lit(None, dtype=pl.String).alias("dup_of"),
            pl.lit(None, dtype=pl.String).alias("status"),
            *[pl.lit(None, dtype=pl.Float32).alias(c) for c in score_columns or []],
        )
        part = conform(part)
        validate(part)
        return write_part(part, path)

    store = EmbeddingStore(store_root)
    live = store.live_meta(shard)
    if rows_path is not None:
        write_rows_file(rows_path, store, shard, live.filter(pl.col("status") == "ok"), columns["cluster"])
    meta = live.select("uid", "label", "location", "caption", "status")
    columns = dict(columns)
    reason, dup_idx, weight, cluster = columns.pop("reason"), columns.pop("dup_of"), columns.pop("weight"), columns.pop("cluster")
    carried = columns.pop("dup_of_uid", None)  # append mode: originals named by the previous version
    dup_uid = np.full(len(dup_idx), None, dtype=object) if carried is None else np.asarray(carried, dtype=object).copy()
    has_dup = dup_idx >= 0
    if has_dup.any():
        dup_uid[has_dup] = uids_at(uid_file, dup_idx[has_dup])
    outside = columns.pop("dup_of_uid", None)  # originals outside the store (leak: the eval row's uid)
    if outside is not None:
        dup_uid = np.where([u is not None for u in outside], outside, dup_uid)
    ok = meta.filter(pl.col("status") == "ok").with_columns(
        pl.Series("keep", np.array([r is None for r in reason], dtype=bool)),
        pl.Series("weight", weight),
        pl.Series("cluster", cluster),
        pl.Series("reason", reason.tolist(), dtype=pl.String),
        pl.Series("dup_of", dup_uid.tolist(), dtype=pl.String),
        *[pl.Series(name, values.tolist(), dtype=pl.String) if values.dtype == object else pl.Series(name, values)
          for name, values in columns.items()],
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


def manifest_counts(reason: np.ndarray, *, n_bad: int, n_missing: int = 0) -> dict[str, Any]:
    """run.json's counts for a manifest of the scored rows' `reason`s (None = kept) plus n_bad bad_input rows and
    n_missing rows whose samples are gone."""
    by_reason = {("kept" if r is None else str(r)): n for r, n in Counter(reason.tolist()).items()}
    if n_bad:
        by_reason["bad_input"] = by_reason.get("bad_input", 0) + n_bad
    if n_missing:
        by_reason["missing"] = by_reason.get("missing", 0) + n_missing
    return {"samples": len(reason) + n_bad + n_missing, "kept": by_reason.get("kept", 0), "by_reason": dict(sorted(by_reason.items()))}


def run_info(cfg: CurateConfig, store: EmbeddingStore, counts: dict[str, Any], notes: list[dict[str, Any]], stats: RunStats) -> dict[str, Any]:
    """The run.json sidecar: config, code version, input fingerprint, counts per stage and reason, timings."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    timings, spans = stats.timings_now()
    return {
        "config": cfg.model_dump(mode="json"),
        "versions": {p: version(p) for p in ("winnow", "torch", "open_clip_torch", "faiss-cpu", "polars", "prefect")},
        "python": platform.python_version(),
        "store": {"path": str(store.root), "fingerprint": store.fingerprint()},
        "counts": {**counts, **stats.counts},
        "steps": notes,
        "orientation": {name: registry()[name].orientation for name in {s.scorer for s in cfg.steps}},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "stage_spans": spans,
        "flow_run": stats.flow_run,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def store_status_counts(store: EmbeddingStore) -> dict[str, int]:
    """Live meta rows by status over every live shard (counted shard by shard)."""
    counts: dict[str, int] = {}
    dead = store.dead_codes()
    for shard in store.shards():
        for status, n in store.live_meta(shard, dead=dead).group_by("status").len().iter_rows():
            counts[str(status)] = counts.get(str(status), 0) + int(n)
    return dict(sorted(counts.items()))
