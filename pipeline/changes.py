"""Change detection for growing stores: what the source holds now against what the store holds.

A sample is identified by (uid, content fingerprint). The source is listed cheaply (uid plus size and a change token:
the file's mtime for local files, the ETag or mtime for fsspec URLs, the member offset for tar members) and joined
with the store's live rows by uid, as columns (no Python object per stored row):

- uid only in the listing: new; only in the store: removed (tombstoned);
- same size and token: unchanged, never read again;
- otherwise a candidate: its bytes are read (not decoded) and hashed; same sha1 as stored = unchanged, else changed
  (the old row is tombstoned, the new content embedded into a new shard).

Precomputed embedding files are compared file by file (size and mtime of the .npy and its metadata): rows of
unchanged files are not read at all; rows of new or changed files are fingerprinted (a 64-bit hash of each row's
bytes) and compared by uid with the store's rows that came from those files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipeline.store import EmbeddingStore, shard_ranges

CHANGE_COUNTS = ("new", "changed", "removed", "unchanged")


@dataclass
class ShardJob:
    """One new store shard of an increment: which listed samples (image sources: indices into the listing) or which
    rows of which file (precomputed) it holds, and the tag its completion marker carries."""

    shard: int
    rows: np.ndarray  # int64
    tag: str
    file: int = -1  # precomputed: index of the source file pair


@dataclass
class Increment:
    """What one run changes in the store; committed by EmbeddingStore.commit once every job's shard is written."""

    jobs: list[ShardJob]
    dead: np.ndarray  # tombstone codes to add (shard << 32 | meta row)
    counts: dict[str, int]  # new, changed, removed, unchanged, hashed (candidates read and hashed)
    shards_before: list[int]
    dead_before: np.ndarray
    next_shard: int
    listing: pl.DataFrame | None = None  # image sources: uid, size, mtime_ns of every listed sample, in ref order
    origins: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def shards_after(self) -> list[int]:
        return [*self.shards_before, *(job.shard for job in self.jobs)]

    def commit(self, store: EmbeddingStore) -> int:
        return store.commit(shards=self.shards_after, dead=np.concatenate([self.dead_before, self.dead]),
                            next_shard=self.next_shard + len(self.jobs), origins=self.origins, files=self.files,
                            changes={k: self.counts[k] for k in ("new", "changed", "removed")})


# ---- listing -------------------------------------------------------------------------------------------------
def file_stats(locations: list[str], source: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(size, change token) per location, int64; -1 where the file is gone or cannot be stat'ed.

    Local files: st_size and st_mtime_ns. fsspec URLs: size and the ETag (hashed) or mtime the filesystem reports.
    (Image folders and webdataset tars record these while listing: sources.Listing.stats, member size and offset.)
    """
    n = len(locations)
    size = np.full(n, -1, dtype=np.int64)
    token = np.full(n, -1, dtype=np.int64)
    for i, location in enumerate(locations):
        if "://" in location:
            size[i], token[i] = _remote_stat(location)
            continue
        try:
            st = os.stat(location)
        except OSError:
            continue
        size[i], token[i] = st.st_size, st.st_mtime_ns
    return size, token


def _remote_stat(url: str) -> tuple[int, int]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except (OSError, ValueError):
        return -1, -1
    etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    token = int.from_bytes(hashlib.sha1(str(etag).encode()).digest()[:8], "little", signed=True) if etag is not None else -1
    return int(info.get("size") or -1), token


def listing_frame(refs: Any, source: Any) -> pl.DataFrame:
    """The source's samples as columns: uid, size, mtime_ns (the change token), in ref order.

    `refs` is the source's columnar listing (sources.Listing): the stats it recorded while listing (image folders,
    webdataset) are used as they are; otherwise (tables) the locations are stat'ed one chunk at a time."""
    stats = refs.stats()
    if stats is None:
        locations = refs.locations()
        parts = [file_stats(locations.slice(s, 65_536).to_list(), source) for s in range(0, len(locations), 65_536)]
        stats = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])) if parts else \
            (np.empty(0, np.int64), np.empty(0, np.int64))
    size, token = stats
    return pl.DataFrame({"uid": refs.uids(), "size": size, "mtime_ns": token},
                        schema={"uid": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64})


def stored_rows(store: EmbeddingStore, shards: list[int] | None = None, dead: np.ndarray | None = None) -> pl.DataFrame:
    """The live rows of the store (or of `shards`): uid, sha1, size, mtime_ns and code (shard << 32 | meta row)."""
    dead = store.dead_codes() if dead is None else dead
    frames = []
    for shard in store.shards() if shards is None else shards:
        live = store.live_meta(shard, dead=dead)
        frames.append(live.select("uid", "sha1", "size", "mtime_ns", ((pl.lit(shard, pl.Int64) * (1 << 32)) + pl.col("meta_row")).alias("code")))
    if not frames:
        return pl.DataFrame(schema={"uid": pl.String, "sha1": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64, "code": pl.Int64})
    return pl.concat(frames)


def live_row_count(store: EmbeddingStore, shards: list[int], dead: np.ndarray) -> int:
    """The live meta rows of `shards`: each completion marker's row count less the shard's tombstones (its meta is
    read only when the marker has no count)."""
    total = 0
    for shard in shards:
        rows = store.read_marker(shard).get("rows")
        if rows is None:
            total += store.live_meta(shard, dead=dead).height
            continue
        lo, hi = np.searchsorted(dead, [shard << 32, (shard + 1) << 32])
        total += int(rows) - int(hi - lo)
    return total


def compare(listing: pl.DataFrame, stored: pl.DataFrame) -> pl.DataFrame:
    """Joins the listing (uid, size, mtime_ns, with its row index `li`) with the stored rows by uid; adds `state`:
    new, removed, unchanged (same size and token) or candidate."""
    joined = listing.with_row_index("li").join(stored, on="uid", how="full", coalesce=True, suffix="_old")
    same = (pl.col("size") == pl.col("size_old")) & (pl.col("mtime_ns") == pl.col("mtime_ns_old")) & (pl.col("size") >= 0)
    return joined.with_columns(
        pl.when(pl.col("code").is_null()).then(pl.lit("new"))
        .when(pl.col("li").is_null()).then(pl.lit("removed"))
        .when(same.fill_null(False)).then(pl.lit("unchanged"))
        .otherwise(pl.lit("candidate")).alias("state")
    )


def _tag(generation: int, payload: Any) -> str:
    return f"g{generation}:" + hashlib.sha1(json.dumps(payload, default=str).encode()).hexdigest()[:16]


def plan_image_increment(store: EmbeddingStore, source: Any, refs: Any, shard_size: int) -> Increment:
    """The increment for an image source: listing vs store by uid and size/token, candidates hashed (bytes read,
    never decoded); new and changed samples cut into new shards of shard_size, in listing (uid) order."""
    from pipeline.decode import sha1_hex

    catalog = store.catalog() or {"generation": 0, "next_shard": 0, "shards": []}
    shards_before = [int(s) for s in catalog["shards"]]
    dead_before = store.dead_codes()
    listing = listing_frame(refs, source)
    joined = compare(listing, stored_rows(store, shards_before, dead_before))
    candidates = joined.filter(pl.col("state") == "candidate")
    changed_li: list[int] = []
    unchanged_candidates = 0
    for li, old_sha1 in candidates.select("li", "sha1").iter_rows():
        try:
            digest = sha1_hex(source.read_bytes(refs[li]))
        except OSError:
            digest = None  # unreadable now: embed again, the embedding stage records the error
        if digest is not None and digest == old_sha1:
            unchanged_candidates += 1
        else:
            changed_li.append(li)
    changed = np.asarray(changed_li, dtype=np.int64)
    new = joined.filter(pl.col("state") == "new")["li"].cast(pl.Int64).to_numpy()
    removed_codes = joined.filter(pl.col("state") == "removed")["code"].to_numpy()
    changed_codes = candidates.filter(pl.col("li").is_in(changed))["code"].to_numpy() if len(changed) else np.empty(0, np.int64)
    to_embed = np.sort(np.concatenate([new, changed]).astype(np.int64))
    next_shard = int(catalog["next_shard"])
    generation = int(catalog["generation"]) + 1
    uids, sizes, tokens = listing["uid"], listing["size"].to_numpy(), listing["mtime_ns"].to_numpy()
    jobs = []
    for i, (start, stop) in enumerate(shard_ranges(len(to_embed), shard_size)):
        rows = to_embed[start:stop]
        payload = [uids.gather(rows).to_list(), sizes[rows].tolist(), tokens[rows].tolist()]
        jobs.append(ShardJob(shard=next_shard + i, rows=rows, tag=_tag(generation, payload)))
    counts = {
        "new": len(new), "changed": len(changed), "removed": len(removed_codes),
        "unchanged": joined.filter(pl.col("state") == "unchanged").height + unchanged_candidates,
        "hashed": candidates.height,
    }
    return Increment(jobs=jobs, dead=np.concatenate([removed_codes, changed_codes]).astype(np.int64), counts=counts,
                     shards_before=shards_before, dead_before=dead_before, next_shard=next_shard, listing=listing)


# ---- precomputed embeddings ----------------------------------------------------------------------------------
def row_fingerprints(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes (uint64), vectorised: the rows' 8-byte words folded with a multiply-xorshift
    mix. Equal rows hash equal; a change anywhere in a row changes its hash (up to 2^-64 collisions)."""
    x = np.ascontiguousarray(x)
    raw = x.view(np.uint8).reshape(len(x), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(x), pad), np.uint8)], axis=1)
    words = raw.view(np.uint64)
    h = np.full(len(x), 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h ^= words[:, j]
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
    return h


def file_fingerprints(path: str, chunk: int = 65_536) -> np.ndarray:
    """row_fingerprints of a whole .npy file, read chunk by chunk through a memory map."""
    emb = np.load(path, mmap_mode="r")
    out = np.empty(len(emb), dtype=np.uint64)
    for s in range(0, len(emb), chunk):
        out[s:s + chunk] = row_fingerprints(np.asarray(emb[s:s + chunk]))
    return out


def fingerprint_hex(h: np.ndarray) -> pl.Series:
    """uint64 fingerprints as decimal strings (the store's sha1 column for precomputed rows), built as a column."""
    return pl.Series("sha1", np.asarray(h, dtype=np.uint64), dtype=pl.UInt64).cast(pl.String)


def _file_key(emb_path: str, meta_path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, path in (("", emb_path), ("meta_", meta_path)):
        try:
            st = os.stat(path)
            out[f"{name}size"], out[f"{name}mtime_ns"] = st.st_size, st.st_mtime_ns
        except OSError:
            out[f"{name}size"], out[f"{name}mtime_ns"] = -1, -1
    return out


def plan_precomputed_increment(store: EmbeddingStore, source: Any) -> Increment:
    """The increment for precomputed embedding files: unchanged file pairs (same sizes and mtimes as when copied)
    are skipped unread; rows of new or changed files are fingerprinted and compared by uid with the store's rows that
    came from changed or vanished files. One new shard per file with rows to copy."""
    catalog = store.catalog() or {"generation": 0, "next_shard": 0, "shards": [], "origins": {}, "files": {}}
    shards_before = [int(s) for s in catalog["shards"]]
    dead_before = store.dead_codes()
    old_files: dict[str, Any] = catalog.get("files", {})
    origins: dict[str, str] = dict(catalog.get("origins", {}))
    files = {p: _file_key(p, m) for p, m in zip(source.emb_paths, source.meta_paths)}
    touched = [i for i, p in enumerate(source.emb_paths) if old_files.get(p) != files[p]]
    touched_paths = {source.emb_paths[i] for i in touched}
    # store rows that may have changed: those copied from a touched or vanished file, or of unknown origin (old stores)
    suspect = [s for s in shards_before if origins.get(str(s)) is None or origins[str(s)] in touched_paths
               or origins[str(s)] not in files]
    stored = stored_rows(store, suspect, dead_before)
    frames = []
    for i in touched:
        frame = source.shard_frame(i).select("uid")
        frames.append(frame.with_columns(fingerprint_hex(file_fingerprints(source.emb_paths[i])),
                                         pl.lit(i, pl.Int64).alias("file"), pl.int_range(pl.len(), dtype=pl.Int64).alias("row")))
    listing = pl.concat(frames) if frames else pl.DataFrame(schema={"uid": pl.String, "sha1": pl.String, "file": pl.Int64, "row": pl.Int64})
    from pipeline.sources import check_unique_uids

    dup = listing.filter(pl.col("uid").is_duplicated())["uid"]
    if len(dup):
        check_unique_uids(dup.to_list())
    joined = listing.join(stored.select("uid", pl.col("sha1").alias("sha1_old"), "code"), on="uid", how="full", coalesce=True)
    state = (pl.when(pl.col("code").is_null()).then(pl.lit("new")).when(pl.col("file").is_null()).then(pl.lit("removed"))
             .when(pl.col("sha1") == pl.col("sha1_old")).then(pl.lit("unchanged")).otherwise(pl.lit("changed")))
    joined = joined.with_columns(state.alias("state"))
    copy = joined.filter(pl.col("state").is_in(["new", "changed"])).sort("file", "row")
    next_shard = int(catalog["next_shard"])
    generation = int(catalog["generation"]) + 1
    jobs = []
    for file_index, rows in copy.group_by("file", maintain_order=True).agg("row").iter_rows():
        rows_arr = np.asarray(rows, dtype=np.int64)
        shard = next_shard + len(jobs)
        jobs.append(ShardJob(shard=shard, rows=rows_arr, file=int(file_index),
                             tag=_tag(generation, [source.emb_paths[file_index], files[source.emb_paths[file_index]], rows_arr.tolist()])))
        origins[str(shard)] = source.emb_paths[file_index]
    unchanged_files_rows = 0  # rows of untouched files: counted from the store, never read from the source
    untouched_shards = [s for s in shards_before if s not in set(suspect)]
    if untouched_shards:
        unchanged_files_rows = live_row_count(store, untouched_shards, dead_before)
    counts = {name: joined.filter(pl.col("state") == name).height for name in ("new", "changed", "removed")}
    counts["unchanged"] = joined.filter(pl.col("state") == "unchanged").height + unchanged_files_rows
    counts["hashed"] = listing.height
    dead = joined.filter(pl.col("state").is_in(["removed", "changed"]))["code"].to_numpy().astype(np.int64)
    origins = {k: v for k, v in origins.items() if v in files}
    return Increment(jobs=jobs, dead=dead, counts=counts, shards_before=shards_before, dead_before=dead_before,
                     next_shard=next_shard, origins=origins, files=files)
