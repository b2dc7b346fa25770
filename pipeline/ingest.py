"""The ingest plan: a source listed (uids checked unique) and cut into store shards."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import CurateConfig
from pipeline.store import shard_ranges

SOURCE_UIDS_DIR = "source_uids"  # under the store: the precomputed source's per-file uid-hash cache


@dataclass
class IngestPlan:
    source: Any
    refs: Any  # image sources: the columnar Listing (sources.Listing), until release_refs(); precomputed: [] (tasks read their own file)
    shards: list[tuple[int, int]]
    n_samples: int
    has_labels: bool
    unlisted: list[dict[str, str]] = field(default_factory=list)  # folders the source could not list: {"path", "why"}

    def release_refs(self) -> None:
        """Drops the listing (bytes per sample) once embedding is done, here and in the source's cache."""
        self.refs = []
        self.source.forget_refs()


def plan_ingest(cfg: CurateConfig) -> IngestPlan:
    """Lists the source's samples (uids checked unique) and cuts them into shards. A precomputed source is
    validated file by file and listed as sizes only: one store shard per embedding file; its uid hashes are cached per
    file under the store (<store>/source_uids, pipeline.uid_cache), so a grown source reads only its new or changed files."""
    from pipeline.sources import source_from_config

    source = source_from_config(cfg.source.arguments())
    if cfg.source.kind == "precomputed":
        sizes = source.scan_shards(cache_dir=cfg.store_path / SOURCE_UIDS_DIR)
        if not sum(sizes):
            raise ValueError(f"source {cfg.source.arguments()} has no samples")
        ends = np.cumsum(sizes).tolist()
        return IngestPlan(source=source, refs=[], shards=list(zip([0, *ends[:-1]], ends)), n_samples=int(ends[-1]),
                          has_labels=source.has_labels())
    refs = source.refs()
    if not refs:
        raise ValueError(f"source {cfg.source.arguments()} has no samples")
    return IngestPlan(source=source, refs=refs, shards=shard_ranges(len(refs), cfg.embed.shard_size), n_samples=len(refs),
                      has_labels=refs.has_labels(), unlisted=source.unlisted_folders())


def listing_counts(plan: IngestPlan, *, show: int = 100) -> dict[str, Any]:
    """run.json's record of the folders the source could not list (their images are not in the manifest): their count
    and the first `show` of them with why; {} when every folder was listed."""
    if not plan.unlisted:
        return {}
    return {"unlisted_folders": {"count": len(plan.unlisted), "folders": plan.unlisted[:show]}}
