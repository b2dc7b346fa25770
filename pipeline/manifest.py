"""Writing, validating and reading manifests (schema in manifests/schema.py) and their run.json sidecar."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from manifests.schema import BASE_REASONS, OPTIONAL, REQUIRED, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SCORE_DTYPE, SCORE_PREFIX, reasons
from pipeline.atomic import fsync_dir
from pipeline.fanout import FanOut, serial_fan_out
from pipeline.faults import failpoint
from pipeline.checked_parquet import read_checked, to_polars, verify_digest, write_checked

MANIFEST_FILE = "manifest.parquet"
RUN_FILE = "run.json"


class ManifestError(ValueError):
    """A manifest violates the schema; the message says which rule and gives examples."""


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Casts known columns to their schema types and orders them: required, optional, scores."""
    cols: list[pl.Expr] = []
    for name, dtype in {**REQUIRED, **OPTIONAL}.items():
        if name in frame.columns:
            cols.append(pl.col(name).cast(dtype))
    score_cols = sorted(c for c in frame.columns if c.startswith(SCORE_PREFIX))
    cols += [pl.col(c).cast(SCORE_DTYPE) for c in score_cols]
    unknown = set(frame.columns) - set(REQUIRED) - set(OPTIONAL) - set(score_cols)
    if unknown:
        raise ManifestError(f"columns not in manifest schema v{SCHEMA_VERSION}: {sorted(unknown)}")
    return frame.select(cols)


def validate(frame: pl.DataFrame) -> None:
    """Checks every schema rule; raises ManifestError naming the first broken one."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ManifestError(f"manifest lacks required columns {missing}")
    for name, dtype in {**REQUIRED, **OPTIONAL}.items():
        if name in frame.columns and frame.schema[name] != dtype:
            raise ManifestError(f"column {name!r} has type {frame.schema[name]}, schema says {dtype}")
    for name in frame.columns:
        if name.startswith(SCORE_PREFIX) and frame.schema[name] != SCORE_DTYPE:
            raise ManifestError(f"score column {name!r} has type {frame.schema[name]}, schema says {SCORE_DTYPE}")
    if frame["uid"].null_count():
        raise ManifestError("uid has nulls")
    dup = frame.filter(pl.col("uid").is_duplicated())["uid"].unique().sort().head(5).to_list()
    if dup:
        raise ManifestError(f"duplicate uids in manifest, e.g. {dup}")
    if frame["keep"].null_count():
        raise ManifestError("keep has nulls")
    if frame["cluster"].null_count():
        raise ManifestError("cluster has nulls (use -1 for rows that were not clustered)")
    weight = frame["weight"].to_numpy()
    if not np.isfinite(weight).all() or (weight < 0).any():
        raise ManifestError("weight must be finite and >= 0")
    keep = frame["keep"].to_numpy()
    if (weight[~keep] != 0).any():
        raise ManifestError("dropped rows must have weight 0")
    kept_with_reason = frame.filter(pl.col("keep") & pl.col("reason").is_not_null() & (pl.col("reason") != "synthetic")).height
    if kept_with_reason:
        raise ManifestError(f"{kept_with_reason} kept rows carry a drop reason")
    dropped_without = frame.filter(~pl.col("keep") & pl.col("reason").is_null()).height
    if dropped_without:
        raise ManifestError(f"{dropped_without} dropped rows have no reason")
    bad_reasons = set(frame["reason"].drop_nulls().unique().to_list()) - set(BASE_REASONS)
    if bad_reasons and bad_reasons - set(reasons()):  # the step registry is read only for step reasons
        raise ManifestError(f"unknown reasons {sorted(bad_reasons - set(reasons()))}; allowed: {reasons()}")


def write_manifest(
    frame: pl.DataFrame,
    out_dir: str | Path,
    run_info: dict[str, Any],
    *,
    rows_per_part: int | None = None,
    fan_out: FanOut | None = None,
) -> Path:
    """Validates `frame` and writes it as a manifest: consecutive slices (in its order) of `rows_per_part` rows
    (one part by default), `fan_out` writing them as parallel tasks; see commit_manifest."""
    frame = conform(frame)
    validate(frame)
    step = max(1, rows_per_part or frame.height)
    calls = [{"part": frame.slice(start, step), "index": i} for i, start in enumerate(range(0, max(frame.height, 1), step))]
    return commit_manifest(out_dir, run_info, write_part, calls, fan_out=fan_out)


def commit_manifest(
    out_dir: str | Path,
    run_info: dict[str, Any],
    write_one: Callable[..., int],
    calls: list[dict[str, Any]],
    *,
    fan_out: FanOut | None = None,
) -> Path:
    """Writes a manifest as a directory of Parquet parts plus run.json, all or nothing; returns the directory.

    Each call of `write_one(**call, path=...)` writes one part, `<out_dir>/manifest.parquet/part-<call["index"]>.parquet`,
    validated, with the schema version and a content checksum in its metadata (write_part); `fan_out` runs them as
    parallel tasks. Polars and pyarrow read the directory as one table (pl.scan_parquet("<run>/manifest.parquet")).
    The parts and run.json go to temporary names first; only then is the old run.json removed, the old manifest
    moved aside, the new one renamed into place and run.json last. So a failure while writing (a full disk, a
    crash, an unserialisable run_info) leaves the previous manifest and run.json exactly as they were, and a
    run.json present means the manifest beside it is complete.
    """
    out_dir = Path(out_dir)
    run_text = json.dumps(run_info, indent=2, sort_keys=True, default=_json_default)
    path = out_dir / MANIFEST_FILE
    run_path = out_dir / RUN_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(f".{MANIFEST_FILE}.*.tmp"), *out_dir.glob(f".{MANIFEST_FILE}.*.old"), *out_dir.glob(f".{RUN_FILE}.*.tmp")]:
        # what a killed writer left behind (its finally block never ran); one writer per run directory
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = out_dir / f".{MANIFEST_FILE}.{token}.tmp"
    aside = out_dir / f".{MANIFEST_FILE}.{token}.old"
    tmp_run = out_dir / f".{RUN_FILE}.{token}.tmp"
    staging.mkdir()
    try:
        staged = [{**call, "path": staging / f"part-{call['index']:05d}.parquet"} for call in calls]
        (fan_out or serial_fan_out)(write_one, [{k: v for k, v in call.items() if k != "index"} for call in staged])
        fsync_dir(staging)
        with open(tmp_run, "w") as fh:
            fh.write(run_text)
            fh.flush()
            os.fsync(fh.fileno())
        run_path.unlink(missing_ok=True)  # from here until the last rename the run reads as unfinished
        failpoint("manifest_commit")
        if path.exists() or path.is_symlink():
            os.replace(path, aside)
        os.replace(staging, path)
        os.replace(tmp_run, run_path)
        fsync_dir(out_dir)
    finally:
        for leftover in (staging, aside, tmp_run):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return path


def write_part(part: pl.DataFrame, path: Path) -> int:
    """One manifest part file (schema version + content checksum), fsynced; returns its rows. `part` must already
    be conformed and validated (a part's uids are unique; across parts the writer of the whole guarantees it)."""
    write_checked(part.to_arrow(), path, extra={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)})
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return part.height


def manifest_parts(path: str | Path) -> list[Path]:
    """The Parquet files of a manifest: the parts of a manifest directory (or a run directory's), or one file."""
    path = Path(path)
    if path.is_dir() and not path.name.endswith(".parquet"):
        path = path / MANIFEST_FILE
    if path.is_dir():
        parts = sorted(path.glob("part-*.parquet"))
        if not parts:
            raise ManifestError(f"{path} holds no part-*.parquet files")
        return parts
    if not path.exists():
        raise ManifestError(f"no manifest at {path}")
    return [path]


def read_manifest(path: str | Path) -> pl.DataFrame:
    """Reads a manifest (a run directory, its manifest.parquet directory of parts, or one part file) and validates it."""
    frames = [_read_part(part) for part in manifest_parts(path)]
    frame = pl.concat(frames) if len(frames) > 1 else frames[0]
    try:
        validate(frame)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    return frame


def _read_part(path: Path) -> pl.DataFrame:
    # pyarrow, not polars: polars can abort the process on a damaged page; the content checksum is verified here.
    table = read_checked(path, ManifestError, verify=False)
    version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY.encode())
    if version is None:
        raise ManifestError(f"{path} has no {SCHEMA_VERSION_KEY} metadata: not a winnow manifest")
    try:
        number = int(version)
    except ValueError:
        raise ManifestError(f"{path} has an unreadable schema version {version[:20]!r}") from None
    if number != SCHEMA_VERSION:
        raise ManifestError(f"{path} has manifest schema v{number}; this winnow reads v{SCHEMA_VERSION}")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: manifest lacks required columns {missing}")
    verify_digest(table, path, ManifestError)
    return to_polars(table, path, ManifestError)


def export_run(run_dir: str | Path, uri: str) -> str:
    """Copies a finished run's manifest parts, report and run.json to `uri` (any fsspec URL: s3://, gs://, file://).

    Object stores have no atomic rename, so the copy keeps the local rule with ordering instead: the remote run.json
    is deleted first, the parts and the report are uploaded, parts left over from an earlier export are deleted,
    and run.json is uploaded last. A reader that finds run.json at `uri` finds the complete manifest beside it.
    Returns the remote run directory.
    """
    import fsspec

    run_dir = Path(run_dir)
    read_run_info(run_dir)  # only a finished run is exported
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/") + "/" + run_dir.name)
    remote = f"{root}/{MANIFEST_FILE}"
    if fs.exists(f"{root}/{RUN_FILE}"):
        fs.rm(f"{root}/{RUN_FILE}")
    fs.makedirs(remote, exist_ok=True)
    parts = manifest_parts(run_dir)
    for part in parts:
        fs.put_file(str(part), f"{remote}/{part.name}")
    stale = {p.rsplit("/", 1)[-1] for p in fs.ls(remote, detail=False)} - {p.name for p in parts}
    for name in sorted(stale):
        fs.rm(f"{remote}/{name}")
    if (run_dir / "report.html").exists():
        fs.put_file(str(run_dir / "report.html"), f"{root}/report.html")
    fs.put_file(str(run_dir / RUN_FILE), f"{root}/{RUN_FILE}")
    return fs.unstrip_protocol(root)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise ManifestError(f"no {RUN_FILE} in {run_dir}: the run did not finish")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON (damaged?): {exc}") from exc
    if not isinstance(info, dict):
        raise ManifestError(f"{path} must hold a JSON object, found {type(info).__name__}")
    return info


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
