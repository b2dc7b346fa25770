"""The curate stages in order, in this process: ingest → embed → index → score → manifest → report.

Each stage is a plain function in its own module (nothing there imports Prefect, so they can be called and tested
on their own): pipeline.ingest (the plan), pipeline.fill_store (embedder, embedding and precomputed copy, targets),
pipeline.ok_rows (the rows the scorers see), pipeline.clustering (k-means), pipeline.scoring (the steps),
pipeline.run_record (manifest and run.json). pipeline.sequence defines their order once; flows/curate.py runs it
with Prefect tasks, run_in_process without Prefect.
"""
from __future__ import annotations

from typing import Any

from pipeline.config import CurateConfig
from pipeline.sequence import InProcess, run_curate_sequence


def run_in_process(cfg: CurateConfig) -> dict[str, Any]:
    """The curate sequence (pipeline.sequence) in this process and without Prefect, every fan-out serial, under
    the run directory's lock. Tests and the single-process benchmark use it.

    Returns run.json's content, plus the manifest stage's own time (run.json is written inside that stage).
    """
    return run_curate_sequence(cfg, InProcess())
