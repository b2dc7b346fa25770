"""The embedding store: a directory of row-aligned embedding and metadata shards.

Layout (DESIGN.md, "Data model"):
    store.json              model, pretrained tag, dim, dtype, preprocessing, versions
    emb/{shard:05d}.npy     L2-normalised embeddings of the shard's decodable rows (float16 or float32)
    meta/{shard:05d}.parquet one row per sample of the shard (uid, location, label, caption, sha1, width, height, status)
    text_emb/{shard:05d}.npy caption embeddings of the same rows, when a precomputed source ships them (optional)
    _done/{shard:05d}       completion marker, written last

The embedding rows of a shard are the meta rows whose status is "ok", in meta order.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written shard
that looks finished; a rerun skips shards whose marker exists.

Growing stores (format 2). `catalog.json` is the commit point of an incremental run: which shards are live, the
tombstoned meta rows (`dead/<generation>.npy`, codes shard << 32 | row), the next free shard number and, for
precomputed sources, which source file each shard came from. New or changed samples go to new shards; removed ones
are tombstoned, never rewritten in place; `compact` rewrites the shards that hold tombstones. A store without a
catalog is a fixed one: shards 0..n_shards-1 of store.json, all live.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.atomic import atomic_group, atomic_path, atomic_write_text
from pipeline.checked_parquet import read_checked, to_polars, verify_digest, write_checked
from pipeline.rows import shard_file

META_SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.String(),
    "location": pl.String(),
    "label": pl.String(),
    "caption": pl.String(),
    "sha1": pl.String(),
    "width": pl.Int32(),
    "height": pl.Int32(),
    "status": pl.String(),
    # image-quality statistics measured while decoding for embedding (scorers/quality.py); null where not measured
    **{c: pl.Float32() for c in ("q_blur", "q_brightness", "q_dark_fraction", "q_bright_fraction", "q_contrast",
                                 "q_colourfulness", "q_entropy", "q_bytes_per_pixel")},
    # the source file's size and mtime when it was read (change detection); null where unknown (v1 stores, tars)
    "size": pl.Int64(),
    "mtime_ns": pl.Int64(),
    "generation": pl.Int64(),  # the catalog generation that added the row (append mode tells new rows by it)
}
# Columns a shard written before they existed may lack: read as null.
_LATE_META = ("q_blur", "q_brightness", "q_dark_fraction", "q_bright_fraction", "q_contrast", "q_colourfulness",
              "q_entropy", "q_bytes_per_pixel", "size", "mtime_ns", "generation")
STORE_FORMAT_VERSION = 2
# Version 1 stores (no size/mtime columns, no catalog) are read as they are and upgraded by the next init.
_READABLE_VERSIONS = (1, 2)
CATALOG_FILE = "catalog.json"
# Keys of the embedder description that are recorded but are not part of its identity: a numpy or torch upgrade
# does not make the same model give another embedding space.
_NOT_IDENTITY = ("versions",)
# Source keys that list what the source holds now (files, shards); they grow with the data and are no identity.
_SOURCE_LISTS = ("emb_paths", "meta_paths", "urls")
# Rows copied (and checked for NaN/Inf) at a time by EmbeddingStore.load.
_LOAD_BLOCK_ROWS = 65_536
# read_meta's results while a run holds its store (meta_cache): (path, inode, size, mtime_ns) → checked meta
_META_CACHE: dict[tuple[str, int, int, int], pl.DataFrame] | None = None


@contextmanager
def meta_cache() -> Iterator[None]:
    """Inside the block, read_meta checks and parses each shard's meta once and then answers from memory: a curate
    run reads every live shard's meta several times (change detection, rows, append, manifest parts, counts), and
    the content checksum is most of the cost. Keyed by the file's inode, size and mtime: a shard written again (an
    atomic rename: a new inode) is read afresh. Nested blocks share the outer one's cache; it is dropped on exit."""
    global _META_CACHE
    if _META_CACHE is not None:
        yield
        return
    _META_CACHE = {}
    try:
        yield
    finally:
        _META_CACHE = None


class StoreError(ValueError):
    """A store on disk is missing, inconsistent with the run's settings, or corrupt."""


@dataclass(frozen=True)
class StoreInfo:
    dim: int
    dtype: str
    embedder: dict[str, Any]
    source: dict[str, Any]
    shard_size: int
    n_shards: int  # a fixed store's shards; a store with a catalog records the live shards of the last init


def identity_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings (dotted names, old → new) that make `wanted` another embedding space than the store's
    `existing` store.json: dim, dtype, the embedder's description minus versions, the source minus its file lists."""
    def strip(info: dict[str, Any]) -> dict[str, Any]:
        embedder = info.get("embedder")
        source = info.get("source")
        return {
            "dim": info.get("dim"),
            "dtype": info.get("dtype"),
            "embedder": {k: v for k, v in embedder.items() if k not in _NOT_IDENTITY} if isinstance(embedder, dict) else embedder,
            "source": {k: v for k, v in source.items() if k not in _SOURCE_LISTS} if isinstance(source, dict) else source,
        }

    out: list[str] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{name}.{key}" if name else str(key))
        elif a != b:
            out.append(f"{name}: {_short(a)} → {_short(b)}")

    walk(strip(existing), strip(wanted), "")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


class EmbeddingStore:
    """Reads and writes one store directory. Cheap to construct; nothing is loaded until asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------------
    def emb_path(self, shard: int) -> Path:
        return self.root / "emb" / f"{shard:05d}.npy"

    def meta_path(self, shard: int) -> Path:
        return self.root / "meta" / f"{shard:05d}.parquet"

    def text_path(self, shard: int) -> Path:
        return self.root / "text_emb" / f"{shard:05d}.npy"

    def done_path(self, shard: int) -> Path:
        return self.root / "_done" / f"{shard:05d}"

    @property
    def info_path(self) -> Path:
        return self.root / "store.json"

    # ---- store.json ---------------------------------------------------------------------------
    def init(self, info: StoreInfo) -> None:
        """Creates the store, or checks that an existing one holds the same embedding space.

        Reusing a store written by another embedder (model, weights, preprocessing, pixels settings, dtype) would
        silently mix embeddings, so a difference is an error naming the settings that differ. The shard count and the
        source's file lists may change (the data grows); store.json is updated to the new ones.
        """
        for sub in ("emb", "meta", "_done"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        wanted = {"format_version": STORE_FORMAT_VERSION, **info.__dict__}
        if self.info_path.exists():
            existing = self.read_info_dict()
            differing = identity_differences(existing, wanted)
            if differing:
                raise StoreError(
                    f"store {self.root} holds embeddings made with other settings ({'; '.join(differing)}); "
                    "use a new store_dir or delete this store"
                )
            if existing.get("format_version") == 1 and not self.catalog_path.exists():
                # a fixed v1 store becomes generation 0 of a growing one: its finished shards, nothing tombstoned
                self._write_catalog({"generation": 0, "shards": [s for s in self.done_shards() if s < int(existing["n_shards"])],
                                     "next_shard": int(existing["n_shards"]), "dead_file": None, "origins": {}, "files": {}})
            if {k: existing.get(k) for k in wanted} == wanted:
                return
        atomic_write_text(self.info_path, json.dumps(wanted, indent=2, sort_keys=True, default=str))

    def read_info_dict(self) -> dict[str, Any]:
        if not self.info_path.exists():
            raise StoreError(f"{self.root} is not an embedding store (no store.json)")
        try:
            raw = json.loads(self.info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.info_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise StoreError(f"{self.info_path} must hold a JSON object, found {type(raw).__name__}")
        version = raw.get("format_version")
        if version not in _READABLE_VERSIONS:
            newer = isinstance(version, int) and version > STORE_FORMAT_VERSION
            raise StoreError(
                f"{self.info_path} has store format version {version!r}; this winnow reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))} "
                + ("(written by a newer winnow: upgrade winnow to read it)" if newer else "(delete the store and embed again)")
            )
        return raw

    def info(self) -> StoreInfo:
        raw = self.read_info_dict()
        try:
            info = StoreInfo(**{k: raw[k] for k in StoreInfo.__dataclass_fields__})
        except KeyError as exc:
            raise StoreError(f"{self.info_path} lacks the field {exc}") from exc
        problems = _info_problems(info)
        if problems:
            raise StoreError(f"{self.info_path} is damaged: {'; '.join(problems)}")
        return info

    # ---- catalog (growing stores) -------------------------------------------------------------
    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    def catalog(self) -> dict[str, Any] | None:
        """The committed catalog, or None for a fixed store (no catalog.json)."""
        if not self.catalog_path.exists():
            return None
        try:
            raw = json.loads(self.catalog_path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.catalog_path} is damaged: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
            raise StoreError(f"{self.catalog_path} is damaged: no shard list")
        return raw

    def _write_catalog(self, catalog: dict[str, Any]) -> None:
        atomic_write_text(self.catalog_path, json.dumps(catalog, indent=1, sort_keys=True))

    def shards(self) -> list[int]:
        """The live shards, in order: the catalog's, or a fixed store's finished shards."""
        catalog = self.catalog()
        if catalog is None:
            return self.done_shards()
        return [int(s) for s in catalog["shards"]]

    def dead_codes(self) -> np.ndarray:
        """Every tombstoned meta row as shard << 32 | row (sorted int64); empty for a fixed store."""
        catalog = self.catalog()
        if catalog is None or not catalog.get("dead_file"):
            return np.empty(0, np.int64)
        path = self.root / catalog["dead_file"]
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read the tombstones {path}: {exc}") from exc
        return np.asarray(codes, dtype=np.int64)

    def changes_since(self, generation: int) -> dict[str, int]:
        """Rows new, changed and removed by the generations after `generation` (from the catalog's history), and the
        live rows unchanged since."""
        catalog = self.catalog() or {}
        out = {"new": 0, "changed": 0, "removed": 0}
        for entry in catalog.get("history", []):
            if int(entry.get("generation", 0)) > generation:
                for key in out:
                    out[key] += int(entry.get(key, 0))
        return out

    def generation(self) -> int:
        """The committed generation (0 for a fixed store or before the first commit)."""
        catalog = self.catalog()
        return 0 if catalog is None else int(catalog.get("generation", 0))

    def alive_ok_rows(self, shard: int, dead: np.ndarray) -> np.ndarray | None:
        """Indices into the shard's embeddings of its ok rows that are not tombstoned; None when none is tombstoned
        (the shard's meta is read only when it holds tombstones)."""
        lo, hi = np.searchsorted(dead, [shard << 32, (shard + 1) << 32])
        if hi == lo:
            return None
        return self.live_meta(shard, dead=dead).filter(pl.col("status") == "ok")["emb_row"].to_numpy()

    def alive_mask(self, shard: int, n_rows: int, dead: np.ndarray | None = None) -> np.ndarray:
        """n_rows bools: the shard's meta rows that are not tombstoned (`dead`: dead_codes(), read once by callers)."""
        dead = self.dead_codes() if dead is None else dead
        mask = np.ones(n_rows, dtype=bool)
        lo, hi = np.searchsorted(dead, [shard << 32, (shard + 1) << 32])
        if hi > lo:
            mask[dead[lo:hi] - (shard << 32)] = False
        return mask

    def commit(self, *, shards: list[int], dead: np.ndarray, next_shard: int, origins: dict[str, str] | None = None,
               files: dict[str, Any] | None = None, changes: dict[str, int] | None = None) -> int:
        """Publishes a new generation: the tombstones first (a new file), then catalog.json atomically. A crash
        before the catalog's rename leaves the previous generation in force. `changes` (rows new, changed, removed,
        unchanged) joins the catalog's history, so a run that resumes after the commit still reports them.
        Returns the new generation number."""
        old = self.catalog() or {"generation": 0}
        generation = int(old.get("generation", 0)) + 1
        dead = np.unique(np.asarray(dead, dtype=np.int64))
        dead_file = None
        if len(dead):
            dead_file = f"dead/{generation:05d}.npy"
            with atomic_path(self.root / dead_file) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, dead)
        history = list(old.get("history", []))
        if changes is not None:
            history.append({"generation": generation, **changes})
        self._write_catalog({"generation": generation, "shards": [int(s) for s in shards], "next_shard": int(next_shard),
                             "dead_file": dead_file, "origins": origins or {}, "files": files or {}, "history": history})
        for stale in (self.root / "dead").glob("*.npy") if (self.root / "dead").is_dir() else []:
            if dead_file is None or stale.name != Path(dead_file).name:
                stale.unlink(missing_ok=True)  # earlier generations' tombstones (readers hold what they loaded)
        return generation

    # ---- shards -------------------------------------------------------------------------------
    def is_done(self, shard: int, tag: str | None = None) -> bool:
        """Whether the shard is finished (and, given `tag`, was written for that plan: a rerun after a crash reuses
        only the shards of the same plan)."""
        if not self.done_path(shard).exists():
            return False
        return tag is None or self.read_marker(shard).get("tag") == tag

    def done_shards(self) -> list[int]:
        done_dir = self.root / "_done"
        if not done_dir.is_dir():
            return []
        return sorted(int(p.name) for p in done_dir.iterdir() if p.name.isdigit())

    def write_shard(self, shard: int, embeddings: np.ndarray, meta: Sequence[dict[str, Any]] | pl.DataFrame, *,
                    text_embeddings: np.ndarray | None = None, tag: str | None = None) -> None:
        """Writes one shard atomically: data files first (temp name + rename), the marker (with `tag`) last.
        `text_embeddings`: the ok rows' caption embeddings (same shape as `embeddings`; all-zero rows = no caption),
        kept in text_emb/."""
        frame = meta if isinstance(meta, pl.DataFrame) else pl.DataFrame(
            [{c: row.get(c) for c in META_SCHEMA} for row in meta], schema=META_SCHEMA, orient="row")
        frame = frame.select([(pl.col(c) if c in frame.columns else pl.lit(None)).cast(t).alias(c) for c, t in META_SCHEMA.items()])
        info = self.info()
        n_ok = int((frame["status"] == "ok").sum())
        if embeddings.shape != (n_ok, info.dim):
            raise StoreError(f"shard {shard}: {embeddings.shape} embeddings for {n_ok} ok rows of dim {info.dim}")
        if not np.isfinite(embeddings).all():
            raise StoreError(f"shard {shard}: embeddings contain NaN or Inf")
        finals = [self.emb_path(shard), self.meta_path(shard)]
        if text_embeddings is not None:
            if text_embeddings.shape != embeddings.shape or not np.isfinite(text_embeddings).all():
                raise StoreError(f"shard {shard}: text embeddings {text_embeddings.shape} must be finite, shaped like {embeddings.shape}")
            finals.append(self.text_path(shard))
        # The data files are written in full before any replaces anything, and a marker of an earlier write of
        # this shard goes first: a full disk leaves the previous shard as it was, never new data under an old marker.
        with atomic_group(*finals, remove_first=[self.done_path(shard)]) as tmps:
            with open(tmps[0], "wb") as fh:
                np.save(fh, np.ascontiguousarray(embeddings, dtype=info.dtype))
            write_checked(frame.to_arrow(), tmps[1])
            if text_embeddings is not None:
                with open(tmps[2], "wb") as fh:
                    np.save(fh, np.ascontiguousarray(text_embeddings, dtype=info.dtype))
        marker: dict[str, Any] = {"rows": frame.height, "ok": n_ok}
        if tag is not None:
            marker["tag"] = tag
        atomic_write_text(self.done_path(shard), json.dumps(marker))

    def read_meta(self, shard: int) -> pl.DataFrame:
        """One shard's meta rows, checked: readable, every column of META_SCHEMA with its type, content checksum."""
        path = self.meta_path(shard)
        cache, key = _META_CACHE, None
        if cache is not None:
            try:
                st = path.stat()
            except OSError:
                st = None
            key = None if st is None else (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
            if key is not None and key in cache:
                return cache[key]
        frame = self._read_meta(path)
        if cache is not None and key is not None:
            cache[key] = frame
        return frame

    def _read_meta(self, path: Path) -> pl.DataFrame:
        # pyarrow, not polars: polars can abort the process on a damaged page. "cannot read" names the file.
        table = read_checked(path, _CannotRead, verify=False) if path.exists() else None
        if table is None:
            raise StoreError(f"cannot read {path}: the file does not exist")
        missing = set(META_SCHEMA) - set(table.column_names) - set(_LATE_META)
        if missing:
            raise StoreError(f"{path} lacks the columns {sorted(missing)}")
        verify_digest(table, path, _CannotRead)
        frame = to_polars(table, path, _CannotRead)
        frame = frame.with_columns([pl.lit(None, dtype=META_SCHEMA[c]).alias(c) for c in _LATE_META if c not in frame.columns])
        wrong = [f"{c} is {frame.schema[c]}, expected {t}" for c, t in META_SCHEMA.items()
                 if frame.schema[c] != t and frame.schema[c] != pl.Null]
        if wrong:
            raise StoreError(f"{path} has columns of the wrong type: {', '.join(wrong)}")
        return frame.select([pl.col(c).cast(t) for c, t in META_SCHEMA.items()])

    def read_embeddings(self, shard: int, *, mmap: bool = True) -> np.ndarray:
        """One shard's embeddings (memory-mapped by default): a 2-d float16/float32 array, else a StoreError."""
        path = self.emb_path(shard)
        try:
            emb = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            if isinstance(emb, np.ndarray) and emb.ndim == 2:
                shard_file(path)  # the file is exactly header + data (numpy ignores trailing bytes)
        except Exception as exc:  # OSError, ValueError, EOFError, and SyntaxError/TokenError from a damaged header
            raise StoreError(f"cannot read {path} (damaged or truncated?): {type(exc).__name__}: {exc}") from exc
        if not isinstance(emb, np.ndarray) or emb.dtype not in (np.float16, np.float32) or emb.ndim != 2:
            what = f"{emb.dtype} array of shape {emb.shape}" if isinstance(emb, np.ndarray) else type(emb).__name__
            raise StoreError(f"{path} holds a {what}; a store shard is a 2-d float16 or float32 array")
        return emb

    def read_marker(self, shard: int) -> dict[str, Any]:
        """The completion marker's content ({"rows": meta rows, "ok": embedding rows}); {} for an empty marker."""
        path = self.done_path(shard)
        try:
            text = path.read_text()
            marker = json.loads(text) if text.strip() else {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"completion marker {path} is damaged: {exc}") from exc
        if not isinstance(marker, dict):
            raise StoreError(f"completion marker {path} is damaged: not a JSON object")
        return marker

    def check_shard(self, shard: int, emb: np.ndarray, meta: pl.DataFrame, info: StoreInfo | None = None) -> None:
        """Row counts agree across a shard's files: meta rows = the marker's rows, ok rows = embedding rows = the
        marker's ok count, embedding width = the store's dim, dtype = the store's dtype. Raises StoreError naming the shard."""
        info = self.info() if info is None else info
        n_ok = int((meta["status"] == "ok").sum())
        if emb.ndim != 2 or emb.shape != (n_ok, info.dim):
            raise StoreError(
                f"shard {shard}: embeddings of shape {emb.shape} in {self.emb_path(shard)} do not match "
                f"{n_ok} ok meta rows of dim {info.dim}"
            )
        if emb.dtype != np.dtype(info.dtype):
            raise StoreError(f"shard {shard}: {self.emb_path(shard)} holds {emb.dtype}, the store says {info.dtype}")
        marker = self.read_marker(shard)
        if marker.get("rows", meta.height) != meta.height or marker.get("ok", n_ok) != n_ok:
            raise StoreError(
                f"shard {shard}: {self.meta_path(shard)} has {meta.height} rows ({n_ok} ok) but its completion marker "
                f"says {marker.get('rows')} ({marker.get('ok')} ok); the shard was changed after it was written"
            )

    def iter_shards(self, *, mmap: bool = True) -> Iterator[tuple[int, np.ndarray, pl.DataFrame]]:
        """Yields (shard, embeddings of the ok rows, full meta) for every live shard, in shard order. Tombstoned rows
        are included: see alive_mask, or live_meta for the rows that count."""
        info = self.info()
        for shard in self.shards():
            meta = self.read_meta(shard)
            emb = self.read_embeddings(shard, mmap=mmap)
            self.check_shard(shard, emb, meta, info)
            yield shard, emb, meta

    def live_meta(self, shard: int, meta: pl.DataFrame | None = None, dead: np.ndarray | None = None) -> pl.DataFrame:
        """The shard's meta rows that are not tombstoned, with `emb_row` (the row's index in the shard's embeddings,
        null where status is not ok) and `meta_row` (its index in the shard's meta)."""
        meta = self.read_meta(shard) if meta is None else meta
        ok = (meta["status"] == "ok").to_numpy()
        emb_row = np.where(ok, np.cumsum(ok) - 1, -1)
        frame = meta.with_columns(
            pl.Series("emb_row", emb_row, dtype=pl.Int64).replace(-1, None),
            pl.Series("meta_row", np.arange(meta.height), dtype=pl.Int64),
        )
        alive = self.alive_mask(shard, meta.height, dead)
        return frame if alive.all() else frame.filter(pl.Series(alive))

    def check_complete(self) -> None:
        catalog = self.catalog()
        if catalog is not None:
            missing = [s for s in catalog["shards"] if not self.is_done(int(s))]
            if missing:
                raise StoreError(f"store {self.root} is damaged: live shards {missing[:10]} have no completion marker")
            return
        expected = set(range(self.info().n_shards))
        done = set(self.done_shards())
        missing = sorted(expected - done)
        if missing:
            raise StoreError(f"store {self.root} is incomplete: shards {missing[:10]} not done")
        extra = sorted(done - expected)
        if extra:
            raise StoreError(f"store {self.root} has completion markers for shards {extra[:10]} beyond its n_shards")

    def load(self, *, dtype: str | None = None) -> tuple[np.ndarray, pl.DataFrame]:
        """All ok rows: embeddings (n_ok × dim) and their meta rows, plus nothing else.

        The scorers need random access to every row, so this materialises the ok embeddings, by default in the
        store's own dtype (float16: 1 GB at 1M × 512, where float32 would be 2 GB). Consumers cast to float32
        or float64 themselves (k-means, SemDeDup, DBP and prototypes chunk by chunk or cluster by cluster), which
        gives the same values as casting here: every float16 is exact in float32. Pass dtype="float32" for a
        float32 copy. Shards are copied one at a time into one preallocated array and each
        shard's memmap is dropped once copied, so the peak is the result plus one shard, never two full copies.
        Stages that can stream use iter_shards instead.
        """
        self.check_complete()
        info = self.info()
        out_dtype = np.dtype(info.dtype if dtype is None else dtype)
        shards: list[int] = []
        parts: list[np.ndarray | None] = []
        metas: list[pl.DataFrame] = []
        dead = self.dead_codes()
        for shard, emb, meta in self.iter_shards():  # memmaps: only the .npy headers are read here
            live = self.live_meta(shard, meta, dead).filter(pl.col("status") == "ok")
            shards.append(shard)
            parts.append(emb if live.height == len(emb) else emb[live["emb_row"].to_numpy()])
            metas.append(live.select(list(META_SCHEMA)))
        emb_all = np.empty((sum(len(p) for p in parts), info.dim), dtype=out_dtype)
        start = 0
        for i, shard in enumerate(shards):
            part = parts[i]
            parts[i] = None
            block = part[:0]
            for s in range(0, len(part), _LOAD_BLOCK_ROWS):  # block by block: the finiteness mask stays small
                block = part[s:s + _LOAD_BLOCK_ROWS]
                if not _all_finite(block):
                    raise StoreError(f"store {self.root} holds NaN or Inf embeddings (shard {shard})")
                emb_all[start + s:start + s + len(block)] = block
            start += len(part)
            del part, block  # unmaps the shard: its pages stop counting towards this process's memory
        meta_all = pl.concat(metas) if metas else pl.DataFrame(schema=META_SCHEMA)
        return emb_all, meta_all

    def load_text(self) -> np.ndarray | None:
        """The caption embeddings of all ok rows (float32, load()'s rows and order: live shards, tombstoned rows left
        out), or None when the store holds none. A store with them for some live shards only is a StoreError."""
        shards = self.shards()
        have = [self.text_path(shard).exists() for shard in shards]
        if not any(have):
            return None
        if not all(have):
            missing = [shard for shard, h in zip(shards, have) if not h]
            raise StoreError(f"store {self.root} has text embeddings for some shards only (none for {missing[:10]})")
        info = self.info()
        dead = self.dead_codes()
        parts = []
        for shard in shards:
            text = self.read_text_embeddings(shard)
            n_ok = int(self.read_marker(shard).get("ok", len(text)))
            if text.shape != (n_ok, info.dim):
                raise StoreError(f"{self.text_path(shard)} does not match the shard's {n_ok} ok rows of dim {info.dim}")
            live = self.live_meta(shard, dead=dead).filter(pl.col("status") == "ok")
            parts.append(text if live.height == n_ok else text[live["emb_row"].to_numpy()])
        return np.concatenate(parts)

    def read_text_embeddings(self, shard: int) -> np.ndarray:
        """One shard's caption embeddings (float32, one row per ok row)."""
        path = self.text_path(shard)
        try:
            text = np.load(path, allow_pickle=False)
        except Exception as exc:  # a damaged file: name it
            raise StoreError(f"cannot read {path} (damaged or truncated?): {type(exc).__name__}: {exc}") from exc
        if not isinstance(text, np.ndarray) or text.ndim != 2:
            raise StoreError(f"{path} is not a 2-d array of caption embeddings")
        return text.astype(np.float32)

    def all_meta(self, where: pl.Expr | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """Meta rows of every live shard that are not tombstoned, bad rows included (status != 'ok').

        `where` and `columns` apply shard by shard, so only what they keep is ever held for the whole store.
        """
        metas = []
        dead = self.dead_codes()
        for shard in self.shards():
            meta = self.live_meta(shard, dead=dead).select(list(META_SCHEMA))
            meta = meta if where is None else meta.filter(where)
            metas.append(meta if columns is None else meta.select(columns))
        if metas:
            return pl.concat(metas)
        empty = pl.DataFrame(schema=META_SCHEMA)
        return empty if columns is None else empty.select(columns)

    def fingerprint(self) -> str:
        """A hash of store.json, the catalog and every live shard's metadata, to tie a manifest to the exact input.

        A meta shard counts by the content digest written in its footer (checked against its rows whenever they are
        read), so only footers are read, not every shard's bytes; a file without one (hand-written) by its bytes."""
        import pyarrow.parquet as pq

        from pipeline.checked_parquet import DIGEST_KEY

        digest = hashlib.sha256(self.info_path.read_bytes())
        if self.catalog_path.exists():
            digest.update(self.catalog_path.read_bytes())
        for shard in self.shards():
            path = self.meta_path(shard)
            try:
                content = (pq.read_schema(path).metadata or {}).get(DIGEST_KEY.encode())
            except Exception:  # noqa: BLE001 - unreadable footer: its bytes still identify it
                content = None
            digest.update(b"digest:" + content if content else path.read_bytes())
        return digest.hexdigest()[:16]


    def compact(self) -> dict[str, int]:
        """Rewrites every live shard that holds tombstones as a new shard without them, commits a generation with
        no tombstones, then deletes the files of shards no generation uses any more (and the index caches).

        Atomic: until the catalog is replaced, readers see the old generation. Resumable: the new shards' numbers
        and tags follow from the committed catalog, so a rerun after a kill reuses the shards already rewritten.
        Returns counts (shards rewritten, rows dropped, files deleted).
        """
        catalog = self.catalog()
        if catalog is None:
            return {"shards_rewritten": 0, "rows_removed": 0, "files_deleted": 0}
        live = [int(s) for s in catalog["shards"]]
        dead = self.dead_codes()
        affected = sorted(set((dead >> 32).tolist()) & set(live))
        next_shard = int(catalog["next_shard"])
        mapping: dict[int, int | None] = {}
        for i, shard in enumerate(affected):
            new = next_shard + i
            tag = f"compact:{catalog['generation']}:{shard}"
            meta = self.read_meta(shard)
            kept = self.live_meta(shard, meta, dead)
            if kept.height == 0:
                mapping[shard] = None
                continue
            if not self.is_done(new, tag):  # the rows keep their `generation`: compaction adds no row
                ok_rows = kept.filter(pl.col("status") == "ok")["emb_row"].to_numpy()
                emb = np.asarray(self.read_embeddings(shard)[ok_rows])
                text = self.read_text_embeddings(shard)[ok_rows] if self.text_path(shard).exists() else None
                self.write_shard(new, emb, kept.select(list(META_SCHEMA)), text_embeddings=text, tag=tag)
            mapping[shard] = new
        removed = len(dead)
        if affected:
            origins = {str(mapping.get(int(k), int(k))): v for k, v in catalog.get("origins", {}).items()
                       if mapping.get(int(k), int(k)) is not None}
            self.commit(shards=[m for s in live if (m := mapping.get(s, s)) is not None], dead=np.empty(0, np.int64),
                        next_shard=next_shard + len(affected), origins=origins, files=catalog.get("files", {}))
        deleted = self.delete_unused_shards()
        return {"shards_rewritten": len(affected), "rows_removed": removed, "files_deleted": deleted}

    def delete_unused_shards(self) -> int:
        """Deletes the files of shards below the catalog's next_shard that are not live (replaced by compaction),
        and the index caches keyed by earlier fingerprints. Shards at or above next_shard may belong to an increment
        in flight and are left alone. Returns the files deleted."""
        import shutil

        catalog = self.catalog()
        if catalog is None:
            return 0
        live, next_shard, deleted = set(int(s) for s in catalog["shards"]), int(catalog["next_shard"]), 0
        for shard in range(next_shard):
            if shard in live:
                continue
            for path in (self.done_path(shard), self.emb_path(shard), self.meta_path(shard), self.text_path(shard)):  # marker first
                if path.exists():
                    path.unlink()
                    deleted += 1
        if (self.root / "index").is_dir():
            shutil.rmtree(self.root / "index", ignore_errors=True)
        return deleted


class _CannotRead(StoreError):
    """A store file that cannot be read; the message starts with 'cannot read' like the other read errors."""

    def __init__(self, message: str) -> None:
        super().__init__(f"cannot read: {message}")


def _info_problems(info: StoreInfo) -> list[str]:
    def positive_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    problems = []
    if not positive_int(info.dim):
        problems.append(f"dim {info.dim!r} is not a positive integer")
    if info.dtype not in ("float16", "float32"):
        problems.append(f"dtype {info.dtype!r} is not float16 or float32")
    if not positive_int(info.shard_size):
        problems.append(f"shard_size {info.shard_size!r} is not a positive integer")
    if not (isinstance(info.n_shards, int) and not isinstance(info.n_shards, bool) and info.n_shards >= 0):
        problems.append(f"n_shards {info.n_shards!r} is not a non-negative integer")
    if not isinstance(info.embedder, dict) or not isinstance(info.source, dict):
        problems.append("embedder and source must be JSON objects")
    return problems


def _all_finite(x: np.ndarray) -> bool:
    """True when no element is NaN or ±Inf.

    float16 is tested on its bits (NaN and Inf are the values whose five exponent bits are all set): an integer
    mask and max, several times faster than np.isfinite, which converts every half to float on this path.
    """
    if x.dtype == np.float16:
        bits = np.ascontiguousarray(x).view(np.uint16)
        return bits.size == 0 or int((bits & 0x7C00).max()) != 0x7C00
    return bool(np.isfinite(x).all())


def shard_ranges(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting n_items into shards of shard_size (the last one shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, n_items)) for start in range(0, n_items, shard_size)]

