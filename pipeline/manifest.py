"""Writing, validating and reading manifests (schema in manifests/schema.py) and their run.json sidecar."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from manifests.schema import OPTIONAL, REASONS, REQUIRED, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SCORE_DTYPE, SCORE_PREFIX
from pipeline.atomic import atomic_path, atomic_write_text

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
    weight = frame["weight"].to_numpy()
    if not np.isfinite(weight).all() or (weight < 0).any():
        raise ManifestError("weight must be finite and >= 0")
    keep = frame["keep"].to_numpy()
    if (weight[~keep] != 0).any():
        raise ManifestError("dropped rows must have weight 0")
    kept_with_reason = frame.filter(pl.col("keep") & pl.col("reason").is_not_null()).height
    if kept_with_reason:
        raise ManifestError(f"{kept_with_reason} kept rows carry a drop reason")
    dropped_without = frame.filter(~pl.col("keep") & pl.col("reason").is_null()).height
    if dropped_without:
        raise ManifestError(f"{dropped_without} dropped rows have no reason")
    bad_reasons = set(frame["reason"].drop_nulls().unique().to_list()) - set(REASONS)
    if bad_reasons:
        raise ManifestError(f"unknown reasons {sorted(bad_reasons)}; allowed: {REASONS}")


def write_manifest(frame: pl.DataFrame, out_dir: str | Path, run_info: dict[str, Any]) -> Path:
    """Validates and writes manifest.parquet (with its schema version) and run.json, each atomically.

    run.json is written after the manifest: a run.json present means the manifest beside it is complete.
    """
    out_dir = Path(out_dir)
    frame = conform(frame)
    validate(frame)
    table = frame.to_arrow()
    meta = dict(table.schema.metadata or {})
    meta[SCHEMA_VERSION_KEY.encode()] = str(SCHEMA_VERSION).encode()
    table = table.replace_schema_metadata(meta)
    path = out_dir / MANIFEST_FILE
    (out_dir / RUN_FILE).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    atomic_write_text(out_dir / RUN_FILE, json.dumps(run_info, indent=2, sort_keys=True, default=_json_default))
    return path


def read_manifest(path: str | Path) -> pl.DataFrame:
    """Reads a manifest file (or the manifest.parquet inside a run directory) and validates it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.exists():
        raise ManifestError(f"no manifest at {path}")
    try:
        file_meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ManifestError(f"{path} is not a readable Parquet file: {exc}") from exc
    version = file_meta.get(SCHEMA_VERSION_KEY.encode())
    if version is None:
        raise ManifestError(f"{path} has no {SCHEMA_VERSION_KEY} metadata: not a winnow manifest")
    if int(version) != SCHEMA_VERSION:
        raise ManifestError(f"{path} has manifest schema v{int(version)}; this winnow reads v{SCHEMA_VERSION}")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:
        raise ManifestError(f"{path} is not a readable Parquet file: {exc}") from exc
    validate(frame)
    return frame


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise ManifestError(f"no {RUN_FILE} in {run_dir}: the run did not finish")
    return json.loads(path.read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
