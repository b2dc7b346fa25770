"""Manifest schema, version 1.

One row a sample. Required columns:
    uid     string   stable id from the source
    keep    bool     whether the sample is in the pruned training set
    weight  float32  sampling / loss weight; 0 where dropped, mean 1 over kept rows unless a reweighting scorer says otherwise
    cluster int32    concept cluster (k-means), -1 where not clustered (e.g. unreadable input)
    reason  string   why the sample was dropped (null when kept); one of reasons()
Optional columns:
    dup_of  string   uid of the sample this one duplicates (exact_dup, semdedup; leak: the evaluation row's uid)
    quality_issue string   the image-quality checks a low_quality row failed, comma-separated
    suggested_label string the label a label_issue / label_mismatch row more likely has
    label, location, caption  carried from the source for loaders and queries
    method  string   how a synthetic row was made (distillation: "dm", "dm+flip", "ncfm", ...)
    status  string   decode status from the store ("ok" or why the bytes could not be used)
    score_<scorer> float32, one per scorer run; orientation recorded in run.json; null where the step did not score
                   the row (dropped by an earlier step, bad input); never NaN
The schema version is stored in the Parquet file's key-value metadata under SCHEMA_VERSION_KEY.
"""
from __future__ import annotations

import polars as pl

from scorers.step import registry

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = "winnow.schema_version"

REQUIRED: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "keep": pl.Boolean(),
    "weight": pl.Float32(),
    "cluster": pl.Int32(),
    "reason": pl.String(),
}
OPTIONAL: dict[str, pl.DataType] = {
    "dup_of": pl.String(),
    "label": pl.String(),
    "location": pl.String(),
    "caption": pl.String(),
    "status": pl.String(),
    "method": pl.String(),
    "quality_issue": pl.String(),
    "suggested_label": pl.String(),
}
SCORE_PREFIX = "score_"
SCORE_DTYPE = pl.Float32()

# Reasons no scoring step owns. Every step registered in scorers/ adds its own (see reasons()).
BASE_REASONS = (
    "bad_input",  # bytes could not be read or decoded
    "select",  # cut by a selection rule on a combined score
    "synthetic",  # rows of a distilled set
    "missing",  # the source no longer holds the sample (listed once, in the version that notices; see pipeline/versions.py)
)


def reasons() -> tuple[str, ...]:
    """Every allowed value of `reason`: BASE_REASONS plus each registered step's drop reason."""
    steps = registry()
    return BASE_REASONS + tuple(sorted({s.reason for s in steps.values() if s.reason is not None} - set(BASE_REASONS)))
