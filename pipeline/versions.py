"""Versioned manifests: every run of a run directory publishes version N beside the earlier ones, with its delta.

Layout of a run directory:
    versions/00001/  manifest.parquet/ (parts), run.json, changes.parquet     version 1, never modified once published
    versions/00002/  ...
    latest -> versions/0000N                                                   swapped atomically (rename of a symlink)
    manifest.parquet -> latest/manifest.parquet, run.json -> latest/run.json, changes.parquet -> latest/changes.parquet

Readers that open <run>/manifest.parquet (pl.scan_parquet, read_manifest, report, ManifestDataset) read the latest
version through the links; an earlier version is <run>/versions/<N>/. A version is written in full under a temporary
name (versions/.0000N.tmp), renamed, and only then does `latest` move: a kill at any point leaves version N-1 as
the latest and readable, and the rerun writes version N again. One writer per run directory (the run lock).

changes.parquet: one row per uid whose state differs from the previous version:
    uid, change (added | removed | kept_to_dropped | dropped_to_kept | weight_changed), old_reason, new_reason,
    old_weight, new_weight. Removed samples stay in the version that notices their removal with reason `missing`
    (and change `removed`); the version after that no longer lists them.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.atomic import fsync_dir
from pipeline.faults import failpoint
from pipeline.manifest import MANIFEST_FILE, RUN_FILE, ManifestError, manifest_parts

VERSIONS_DIR = "versions"
LATEST = "latest"
CHANGES_FILE = "changes.parquet"
CHANGES = ("added", "removed", "kept_to_dropped", "dropped_to_kept", "weight_changed")
_LINKED = (MANIFEST_FILE, RUN_FILE, CHANGES_FILE)
# Weights are float32 and renormalised over the kept rows: smaller differences are rounding, not a change.
WEIGHT_TOLERANCE = 1e-4


def version_dir(run_dir: str | Path, version: int) -> Path:
    return Path(run_dir) / VERSIONS_DIR / f"{version:05d}"


def latest_version(run_dir: str | Path) -> int | None:
    """The published version `latest` points to; None before the first one (a legacy run directory is migrated first)."""
    link = Path(run_dir) / LATEST
    if not link.is_symlink():
        return None
    try:
        return int(Path(os.readlink(link)).name)
    except ValueError as exc:
        raise ManifestError(f"{link} points to {os.readlink(link)!r}, not a version folder") from exc


def versions(run_dir: str | Path) -> list[int]:
    root = Path(run_dir) / VERSIONS_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def migrate_legacy(run_dir: str | Path) -> None:
    """A run directory written before versions (manifest.parquet a real folder, run.json a real file) becomes
    version 1. Safe to repeat after a kill: each step checks what is already done."""
    run_dir = Path(run_dir)
    manifest, run_json = run_dir / MANIFEST_FILE, run_dir / RUN_FILE
    legacy = (manifest.exists() and not manifest.is_symlink()) or (run_json.exists() and not run_json.is_symlink())
    if not legacy or latest_version(run_dir) is not None:
        return
    if not (run_json.exists() and not run_json.is_symlink()):
        # a manifest without run.json never finished: nothing to keep
        shutil.rmtree(manifest, ignore_errors=True) if manifest.is_dir() else manifest.unlink(missing_ok=True)
        return
    target = version_dir(run_dir, 1)
    target.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, RUN_FILE):
        if (run_dir / name).exists() and not (run_dir / name).is_symlink():
            os.replace(run_dir / name, target / name)
    _point_latest(run_dir, 1)


def _point_latest(run_dir: Path, version: int) -> None:
    tmp = run_dir / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"{VERSIONS_DIR}/{version:05d}", tmp)
    os.replace(tmp, run_dir / LATEST)  # the publication: one rename
    for name in _LINKED:
        link = run_dir / name
        if not link.is_symlink():
            if link.exists():
                shutil.rmtree(link) if link.is_dir() else link.unlink()
            os.symlink(f"{LATEST}/{name}", link)
    fsync_dir(run_dir)


def publish(run_dir: str | Path, write: Callable[[Path, int], None]) -> int:
    """Writes the next version with `write(folder, version)` (it must leave manifest.parquet and run.json in the
    folder), adds changes.parquet against the previous version, and publishes it. Returns the version number."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    migrate_legacy(run_dir)
    previous = latest_version(run_dir)
    version = (previous or 0) + 1
    staging = run_dir / VERSIONS_DIR / f".{version:05d}.tmp"
    final = version_dir(run_dir, version)
    for stale in (staging, final):  # what a killed run left: version N is written again from the start
        if stale.exists():
            shutil.rmtree(stale)
    staging.mkdir(parents=True)
    write(staging, version)
    if not (staging / RUN_FILE).exists():
        raise ManifestError(f"version {version} of {run_dir} was not written completely (no {RUN_FILE})")
    old = version_dir(run_dir, previous) / MANIFEST_FILE if previous else None
    changes = manifest_changes(old, staging / MANIFEST_FILE)
    tmp = staging / f".{CHANGES_FILE}.tmp"
    changes.write_parquet(tmp)
    os.replace(tmp, staging / CHANGES_FILE)
    _add_to_run_json(staging / RUN_FILE, {"version": version, "previous_version": previous, "delta": change_counts(changes)})
    fsync_dir(staging)
    os.replace(staging, final)
    fsync_dir(final.parent)
    failpoint("version_publish")
    _point_latest(run_dir, version)
    return version


def _add_to_run_json(path: Path, fields: dict[str, Any]) -> None:
    import json

    from pipeline.atomic import atomic_write_text

    info = json.loads(path.read_text())
    info.update(fields)
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True, default=str))


_DECISION_COLUMNS = ["uid", "keep", "weight", "reason"]
CHANGES_SCHEMA = {"uid": pl.String, "change": pl.String, "old_reason": pl.String, "new_reason": pl.String,
                  "old_weight": pl.Float32, "new_weight": pl.Float32}


def _decisions(manifest: Path | None, skip: set[str] = frozenset()) -> pl.LazyFrame:
    digests = {} if manifest is None or not skip else _part_digests(manifest)
    parts = [] if manifest is None else [p for p in manifest_parts(manifest) if digests.get(p.name) not in skip]
    if not parts:
        return pl.LazyFrame(schema={"uid": pl.String, "keep": pl.Boolean, "weight": pl.Float32, "reason": pl.String})
    return pl.scan_parquet([str(p) for p in parts]).select(_DECISION_COLUMNS)


def _part_digests(manifest: Path) -> dict[str, str]:
    """Part name → content digest from a manifest directory's parts index ({} for a lone file)."""
    from pipeline.manifest import PARTS_FILE, read_parts_index

    return {e["name"]: e["digest"] for e in read_parts_index(manifest)} if (manifest / PARTS_FILE).exists() else {}


def _shared_parts(old: Path | None, new: Path) -> set[str]:
    """Digests of parts found once in each manifest: the same rows with the same values on both sides (an append run
    links an untouched shard's part into the next version), so they hold no change and are not read."""
    if old is None:
        return set()
    from collections import Counter

    before, after = Counter(_part_digests(old).values()), Counter(_part_digests(new).values())
    return {d for d, n in before.items() if n == 1 and after.get(d) == 1}


def manifest_changes(old: Path | None, new: Path) -> pl.DataFrame:
    """The delta between two manifests (None = empty): one row per uid that was added, removed, changed keep, or
    changed weight. A row carried with reason `missing` counts as removed; one already `missing` before is not
    counted again. Parts with the same content digest in both are skipped (they change nothing)."""
    shared = _shared_parts(old, new)
    before = _decisions(old, shared).filter(pl.col("reason").fill_null("") != "missing")
    after = _decisions(new, shared)
    joined = before.join(after, on="uid", how="full", coalesce=True, suffix="_new")
    gone = pl.col("keep_new").is_null() | (pl.col("reason_new").fill_null("") == "missing")
    change = (
        pl.when(pl.col("keep").is_null()).then(pl.lit("added"))
        .when(gone).then(pl.lit("removed"))
        .when(pl.col("keep") & ~pl.col("keep_new")).then(pl.lit("kept_to_dropped"))
        .when(~pl.col("keep") & pl.col("keep_new")).then(pl.lit("dropped_to_kept"))
        .when((pl.col("weight") - pl.col("weight_new")).abs() > WEIGHT_TOLERANCE).then(pl.lit("weight_changed"))
        .otherwise(pl.lit(None, pl.String))
    )
    return (
        joined.with_columns(change.alias("change"))
        .filter(pl.col("change").is_not_null())
        .filter(~(pl.col("keep").is_null() & (pl.col("reason_new").fill_null("") == "missing")))
        .select("uid", "change", pl.col("reason").alias("old_reason"),
                pl.when(pl.col("keep_new").is_null()).then(pl.lit("missing")).otherwise(pl.col("reason_new")).alias("new_reason"),
                pl.col("weight").alias("old_weight"), pl.col("weight_new").alias("new_weight"))
        .sort("uid")
        .collect()
        .cast(CHANGES_SCHEMA)
    )


def read_changes(run_dir: str | Path, *, from_version: int | None = None, to_version: int | None = None) -> tuple[int | None, int, pl.DataFrame]:
    """The delta between two published versions of a run (default: the latest and the one before it).
    Returns (from, to, changes); `from` None means "from nothing" (the first version: every row added)."""
    run_dir = Path(run_dir)
    published = versions(run_dir)
    latest = latest_version(run_dir)
    if latest is None:
        if (run_dir / MANIFEST_FILE).exists():
            raise ManifestError(f"{run_dir} was written before manifest versions; the next `winnow run` makes it version 1")
        raise ManifestError(f"no published manifest version in {run_dir}")
    to_version = latest if to_version is None else to_version
    if from_version is None:
        from_version = to_version - 1 if to_version > 1 else None
    for name, v in (("--to", to_version), ("--from", from_version)):
        if v is not None and (v not in published or v > latest):
            raise ManifestError(f"{name} {v}: {run_dir} has versions {published[0]}..{latest}")
    if from_version is not None and from_version == to_version - 1 and (version_dir(run_dir, to_version) / CHANGES_FILE).exists():
        return from_version, to_version, pl.read_parquet(version_dir(run_dir, to_version) / CHANGES_FILE)
    old = version_dir(run_dir, from_version) / MANIFEST_FILE if from_version is not None else None
    return from_version, to_version, manifest_changes(old, version_dir(run_dir, to_version) / MANIFEST_FILE)


def change_counts(changes: pl.DataFrame) -> dict[str, int]:
    """Rows per change kind (every kind present, zeros included)."""
    counted = dict(changes.group_by("change").len().iter_rows())
    return {name: int(counted.get(name, 0)) for name in CHANGES}


def format_changes(run_dir: str | Path, from_version: int | None, to_version: int, changes: pl.DataFrame) -> str:
    """`winnow diff`'s text: counts per change, then per (change, old reason → new reason)."""
    head = f"winnow diff {run_dir}: version {from_version if from_version is not None else '(none)'} → {to_version}"
    lines = [head]
    for name, n in change_counts(changes).items():
        lines.append(f"  {name:<16} {n:>9}")
    table = changes.group_by("change", "old_reason", "new_reason").len().sort("change", "old_reason", "new_reason", nulls_last=True)
    if table.height:
        lines.append("  by reason (old → new; kept = none):")
        for change, old, new, n in table.iter_rows():
            lines.append(f"    {change:<16} {old or 'kept':>10} → {new or 'kept':<10} {n:>9}")
    return "\n".join(lines)


def carry_decisions(run_dir: str | Path, wanted: Callable[[str], bool] | None = None) -> pl.DataFrame | None:
    """The latest version's rows (every column, or those `wanted` accepts), for append mode; None before the first
    version."""
    latest = latest_version(Path(run_dir))
    if latest is None:
        return None
    parts = [str(p) for p in manifest_parts(version_dir(run_dir, latest) / MANIFEST_FILE)]
    columns = None if wanted is None else [c for c in pl.read_parquet_schema(parts[0]) if wanted(c)]
    return pl.read_parquet(parts, columns=columns)


def version_info(run_dir: str | Path, version: int) -> dict[str, Any]:
    from pipeline.manifest import read_run_info

    return read_run_info(version_dir(run_dir, version))
