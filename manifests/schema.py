"""Manifest schema, version 1.

One row a sample. Required columns:
    uid     string   stable id from the source
    keep    bool     whether the sample is in the pruned training set
    weight  float32  sampling / loss weight; 0 where dropped, mean 1 over kept rows unless a reweighting scorer says otherwise
    cluster int32    concept cluster (k-means), -1 where not clustered (e.g. unreadable input)
    reason  string   why the sample was dropped (null when kept); one of REASONS
Optional columns:
    dup_of  string   uid of the sample this one duplicates (exact_dup, semdedup; leak: the evaluation row's uid)
    quality_issue string   the image-quality checks a low_quality row failed, comma-separated
    suggested_label string the label a label_issue / label_mismatch row more likely has
    label, location, caption  carried from the source for loaders and queries
    method  string   how a synthetic row was made (distillation: "dm", "dm+flip", "ncfm", ...)
    status  string   decode status from the store ("ok" or why the bytes could not be used)
    score_<scorer> float32, one per scorer run; orientation recorded in run.json
The schema version is stored in the Parquet file's key-value metadata under SCHEMA_VERSION_KEY.
"""
from __future__ import annotations

import polars as pl

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

REASONS = (
    "bad_input",  # bytes could not be read or decoded
    "exact_dup",  # same sha1 as an earlier sample
    "semdedup",  # semantic near-duplicate (SemDeDup)
    "dbp_quota",  # outside its concept cluster's DBP quota
    "prototype",  # pruned by the prototype (distance-to-centroid) score
    "el2n",
    "grand",
    "aum",
    "random",
    "ot",  # not chosen by optimal-transport targeted selection
    "select",  # cut by a selection rule on a combined score
    "synthetic",  # rows of a distilled set
    "low_quality",  # failed an image-quality check (quality_issue names which)
    "outlier",  # far from its nearest neighbours in embedding space
    "leak",  # a copy or near copy of an evaluation row (dup_of names it)
    "label_issue",  # confident learning flags its label (suggested_label)
    "label_mismatch",  # its label is not among the zero-shot top-k of its image (suggested_label)
    "clip_score",  # caption and image agree too little
    "head",  # a model head's score (aesthetic, NSFW, ...) outside the kept range
)
