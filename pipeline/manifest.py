"""Writing, validating and reading manifests (schema in manifests/schema.py) and their run.json sidecar."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
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
# The parts index of a manifest directory: a zero-row Parquet file with the parts' schema whose key-value metadata
# lists every part (name, rows, bytes, content digest). Parquet, not JSON: polars refuses a directory holding files
# of another extension, and a zero-row file with the same schema adds nothing to pl.scan_parquet(<dir>).
PARTS_FILE = "_parts.parquet"
PARTS_KEY = "winnow.manifest_parts"


class ManifestError(ValueError):
    """A manifest violates the schema; the message says which rule and gives examples."""


def conform(frame: pl.DataFrame) -> pl.DataFrame:
    """Casts known columns to their schema types and orders them: required, optional, scores."""
    cols: list[pl.Expr] = []
    for name, dtype in {**REQUIRED, **OPTIONAL}.items():
        if name in frame.columns:
            cols.append(pl.col(name).cast(dtype))
    score_cols = sorted(c for c in frame.columns if c.startswith(SCORE_PREFIX))
    # NaN (a row a step never scored) becomes null: polars sorts NaN above every number and `NaN > x` is true, so a
    # filter such as score > 0.9 would pick unscored rows; null is left out of comparisons
    cols += [pl.col(c).cast(SCORE_DTYPE).fill_nan(None) for c in score_cols]
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
    run_info: dict[str, Any] | Callable[[], dict[str, Any]],
    write_one: Callable[..., int],
    calls: list[dict[str, Any]],
    *,
    fan_out: FanOut | None = None,
) -> Path:
    """Writes a manifest as a directory of Parquet parts plus run.json, all or nothing; returns the directory.

    `run_info` is run.json's content, or a function that makes it once the parts are written (so it can hold the
    time spent writing them). Each call of `write_one(**call, path=...)` writes one part, `<out_dir>/manifest.parquet/part-<call["index"]>.parquet`,
    validated, with the schema version and a content checksum in its metadata (write_part); `fan_out` runs them as
    parallel tasks; the parts index (write_parts_index: names, rows, sizes, digests) is the directory's last file.
    Polars and pyarrow read the directory as one table (pl.scan_parquet("<run>/manifest.parquet")).
    The parts and run.json go to temporary names first; only then is the old run.json removed, the old manifest
    moved aside, the new one renamed into place and run.json last. So a failure while writing (a full disk, a
    crash, an unserialisable run_info) leaves the previous manifest and run.json exactly as they were, and a
    run.json present means the manifest beside it is complete.
    """
    out_dir = Path(out_dir)

    def serialise() -> str:
        return json.dumps(run_info() if callable(run_info) else run_info, indent=2, sort_keys=True, default=_json_default)

    run_text = None if callable(run_info) else serialise()  # a mapping that cannot be serialised fails before any work
    path = out_dir / MANIFEST_FILE
    run_path = out_dir / RUN_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(f".{MANIFEST_FILE}.*.tmp"), *out_dir.glob(f".{MANIFEST_FILE}.*.old"), *out_dir.glob(f".{RUN_FILE}.*.tmp")]:
        # what a killed writer left behind (its finally block never ran); a live writer's files are left alone
        if not _owner_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    token = f"{_HOST_ID}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # names its writer: see _owner_alive
    staging = out_dir / f".{MANIFEST_FILE}.{token}.tmp"
    aside = out_dir / f".{MANIFEST_FILE}.{token}.old"
    tmp_run = out_dir / f".{RUN_FILE}.{token}.tmp"
    staging.mkdir()
    try:
        staged = [{**call, "path": staging / f"part-{call['index']:05d}.parquet"} for call in calls]
        (fan_out or serial_fan_out)(write_one, [{k: v for k, v in call.items() if k != "index"} for call in staged])
        write_parts_index(staging)
        with open(tmp_run, "w") as fh:
            fh.write(run_text if run_text is not None else serialise())
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


_HOST_ID = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner_alive(name: str) -> bool:
    """Whether the writer named in a temporary file's name (`.<file>.<host>-<pid>-<token>.tmp`) may still be running.

    Only a writer of this machine whose pid is gone is known dead; another machine's, or a name without an owner,
    counts as alive (left in place rather than deleted under a live writer).
    """
    from pipeline.runlock import pid_alive

    parts = name.split(".")
    owner = parts[-2].split("-") if len(parts) >= 3 else []
    if len(owner) != 3 or owner[0] != _HOST_ID or not owner[1].isdigit():
        return True
    return pid_alive(int(owner[1]))


def write_part(part: pl.DataFrame, path: Path) -> int:
    """One manifest part file (schema version + content checksum), fsynced; returns its rows. `part` must already
    be conformed and validated (a part's uids are unique; across parts the writer of the whole guarantees it)."""
    write_checked(part.to_arrow(), path, extra={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)})
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return part.height


def write_parts_index(directory: str | Path) -> Path:
    """Records the part-*.parquet files of a manifest directory in its parts index (PARTS_FILE), fsynced, and fsyncs
    the directory. Every writer of a manifest directory calls this once all parts are written: the index is the
    directory's last file, and readers (manifest_parts) refuse a directory whose parts disagree with it."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    entries, schema = [], None
    for part in sorted(directory.glob("part-*.parquet")):
        footer = pq.ParquetFile(part)
        digest = _stored_digest(footer.schema_arrow.metadata)
        if not digest:
            raise ManifestError(f"{part} carries no content digest: write parts with write_part")
        entries.append({"name": part.name, "rows": footer.metadata.num_rows, "bytes": part.stat().st_size, "digest": digest})
        schema = schema or footer.schema_arrow
    if schema is None:
        raise ManifestError(f"{directory} holds no part-*.parquet files to index")
    index = schema.remove_metadata().with_metadata({
        PARTS_KEY: json.dumps({"parts": entries, "rows": sum(e["rows"] for e in entries)}),
        SCHEMA_VERSION_KEY: str(SCHEMA_VERSION),
    })
    final = directory / PARTS_FILE
    tmp = directory / f".{PARTS_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(index.empty_table(), tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    return final


def read_parts_index(directory: str | Path) -> list[dict[str, Any]]:
    """The parts a manifest directory's index lists ({"name", "rows", "bytes", "digest"}), in order."""
    import pyarrow.parquet as pq

    path = Path(directory) / PARTS_FILE
    if not path.exists():
        raise ManifestError(
            f"{directory} has no {PARTS_FILE}: the manifest's writer did not finish (or an older winnow wrote it); "
            "rerun the step that writes it"
        )
    try:
        raw = (pq.read_schema(path).metadata or {})[PARTS_KEY.encode()]
        entries = json.loads(raw)["parts"]
        for e in entries:
            if not (isinstance(e["name"], str) and isinstance(e["rows"], int) and isinstance(e["bytes"], int) and isinstance(e["digest"], str)):
                raise TypeError("bad entry")
    except Exception as exc:  # unreadable file, missing key, bad JSON or entries: all mean a damaged index
        raise ManifestError(f"{path} is damaged or not a winnow parts index: {type(exc).__name__}: {exc}") from exc
    return entries


def _indexed(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """A manifest directory's parts with their index entries; a listed part missing or a file the index does not list
    (polars would read it too) is a ManifestError naming them."""
    entries = read_parts_index(directory)
    listed = [e["name"] for e in entries]
    present = sorted(p.name for p in directory.iterdir() if p.name != PARTS_FILE)
    missing = sorted(set(listed) - set(present))
    extra = sorted(set(present) - set(listed))
    if missing or extra:
        what = ([f"missing part(s) {missing}"] if missing else []) + ([f"unlisted file(s) {extra}"] if extra else [])
        raise ManifestError(f"{directory} does not match its {PARTS_FILE}: {'; '.join(what)}")
    return [(directory / e["name"], e) for e in entries]


def _check_entry(part: Path, entry: dict[str, Any], rows: int, digest: str) -> None:
    size = part.stat().st_size
    if size != entry["bytes"]:
        raise ManifestError(f"{part} has {size} bytes, {PARTS_FILE} says {entry['bytes']} (replaced or truncated?)")
    if rows != entry["rows"] or digest != entry["digest"]:
        raise ManifestError(
            f"{part} holds {rows} rows with digest {digest[:12]!r}, {PARTS_FILE} says {entry['rows']} rows, "
            f"{entry['digest'][:12]!r} (replaced by another file?)"
        )


def _stored_digest(schema_metadata: dict[bytes, bytes] | None) -> str:
    from pipeline.checked_parquet import DIGEST_KEY

    return (schema_metadata or {}).get(DIGEST_KEY.encode(), b"").decode("ascii", "replace")


def check_parts(directory: str | Path) -> list[Path]:
    """The parts of a manifest directory, checked against its index from their footers only (no rows read): names
    (_indexed), then each part's size, row count and content digest. read_manifest checks the same while it reads
    and verifies every part's rows against its digest, so the chain from index to rows is checked on each full read."""
    import pyarrow.parquet as pq

    parts = []
    for part, entry in _indexed(Path(directory)):
        try:
            footer = pq.ParquetFile(part)
            rows, digest = footer.metadata.num_rows, _stored_digest(footer.schema_arrow.metadata)
        except Exception as exc:
            raise ManifestError(f"{part} is not a readable Parquet file (damaged?): {type(exc).__name__}: {exc}") from exc
        _check_entry(part, entry, rows, digest)
        parts.append(part)
    return parts


def _manifest_files(path: str | Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """The Parquet files of a manifest and their index entries (None for a lone file), names checked (_indexed)."""
    path = Path(path)
    if path.is_dir() and not path.name.endswith(".parquet"):
        path = path / MANIFEST_FILE
    if path.is_dir():
        return _indexed(path)
    if not path.exists():
        raise ManifestError(f"no manifest at {path}")
    if path.name == PARTS_FILE:
        raise ManifestError(f"{path} is a manifest's parts index, not a part: give its directory")
    if (path.parent / PARTS_FILE).exists():  # a part of an indexed directory: that directory must be whole
        return [(p, e) for p, e in _indexed(path.parent) if p.name == path.name]
    return [(path, None)]


def manifest_parts(path: str | Path) -> list[Path]:
    """The Parquet files of a manifest: the parts of a manifest directory (or a run directory's), checked against the
    directory's parts index (check_parts), or one file (checked against its entry when its folder has an index)."""
    files = _manifest_files(path)
    if files[0][1] is None:
        return [files[0][0]]
    checked = set(check_parts(files[0][0].parent))
    return [p for p, _ in files if p in checked]


def read_manifest(path: str | Path) -> pl.DataFrame:
    """Reads a manifest (a run directory, its manifest.parquet directory of parts, or one part file) and validates it:
    the parts against the directory's index, each part's rows against its digest, then the schema rules."""
    frames = [_read_part(part, entry) for part, entry in _manifest_files(path)]
    frame = pl.concat(frames) if len(frames) > 1 else frames[0]
    try:
        validate(frame)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    return frame


def _read_part(path: Path, entry: dict[str, Any] | None = None) -> pl.DataFrame:
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
    if entry is not None:
        _check_entry(path, entry, table.num_rows, _stored_digest(table.schema.metadata))
    return to_polars(table, path, ManifestError)


def export_run(run_dir: str | Path, uri: str) -> str:
    """Copies a finished run's manifest parts, report and run.json to `uri` (any fsspec URL: s3://, gs://, file://).

    Object stores have no atomic rename, so the copy keeps the local rule with ordering instead: the remote run.json
    is deleted first, the parts uploaded, parts left over from an earlier export deleted, the parts index and the report
    uploaded, and run.json last. A reader that finds run.json at `uri` finds the complete manifest beside it.
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
    stale = {p.rsplit("/", 1)[-1] for p in fs.ls(remote, detail=False)} - {p.name for p in parts} - {PARTS_FILE}
    for name in sorted(stale):
        fs.rm(f"{remote}/{name}")
    fs.put_file(str(parts[0].parent / PARTS_FILE), f"{remote}/{PARTS_FILE}")  # the index after its parts
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
