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
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.atomic import atomic_group, atomic_write_text
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
}
# Columns a shard written before they existed may lack: read as null.
_LATE_META = ("q_blur", "q_brightness", "q_dark_fraction", "q_bright_fraction", "q_contrast", "q_colourfulness",
              "q_entropy", "q_bytes_per_pixel")
STORE_FORMAT_VERSION = 1
# Rows copied (and checked for NaN/Inf) at a time by EmbeddingStore.load.
_LOAD_BLOCK_ROWS = 65_536


class StoreError(ValueError):
    """A store on disk is missing, inconsistent with the run's settings, or corrupt."""


@dataclass(frozen=True)
class StoreInfo:
    dim: int
    dtype: str
    embedder: dict[str, Any]
    source: dict[str, Any]
    shard_size: int
    n_shards: int


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
        """Creates the store, or checks that an existing one was made with the same settings.

        Resuming into a store written by another embedder or source would silently mix embeddings,
        so a mismatch is an error that says which setting differs.
        """
        for sub in ("emb", "meta", "_done"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        wanted = {"format_version": STORE_FORMAT_VERSION, **info.__dict__}
        if self.info_path.exists():
            existing = self.read_info_dict()
            differing = [k for k in ("dim", "dtype", "embedder", "source", "shard_size", "n_shards") if existing.get(k) != wanted[k]]
            if differing:
                raise StoreError(
                    f"store {self.root} was written with different settings ({', '.join(differing)}); "
                    "use a new store directory or delete this one"
                )
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
        if version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"{self.info_path} has store format version {version!r}; this winnow reads version {STORE_FORMAT_VERSION}"
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

    # ---- shards -------------------------------------------------------------------------------
    def is_done(self, shard: int) -> bool:
        return self.done_path(shard).exists()

    def done_shards(self) -> list[int]:
        done_dir = self.root / "_done"
        if not done_dir.is_dir():
            return []
        return sorted(int(p.name) for p in done_dir.iterdir() if p.name.isdigit())

    def write_shard(self, shard: int, embeddings: np.ndarray, meta: Sequence[dict[str, Any]] | pl.DataFrame, *,
                    text_embeddings: np.ndarray | None = None) -> None:
        """Writes one shard atomically: data files first (temp name + rename), the marker last. `text_embeddings`: the
        ok rows' caption embeddings (same shape as `embeddings`; all-zero rows = no caption), kept in text_emb/."""
        frame = meta if isinstance(meta, pl.DataFrame) else pl.DataFrame(list(meta), schema=META_SCHEMA, orient="row")
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
        atomic_write_text(self.done_path(shard), json.dumps({"rows": frame.height, "ok": n_ok}))

    def read_meta(self, shard: int) -> pl.DataFrame:
        """One shard's meta rows, checked: readable, every column of META_SCHEMA with its type, content checksum."""
        path = self.meta_path(shard)
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
        """Yields (shard, embeddings of the ok rows, full meta) for every finished shard, in shard order."""
        info = self.info()
        for shard in self.done_shards():
            meta = self.read_meta(shard)
            emb = self.read_embeddings(shard, mmap=mmap)
            self.check_shard(shard, emb, meta, info)
            yield shard, emb, meta

    def check_complete(self) -> None:
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
        for shard, emb, meta in self.iter_shards():  # memmaps: only the .npy headers are read here
            shards.append(shard)
            parts.append(emb)
            metas.append(meta.filter(pl.col("status") == "ok"))
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
        """The caption embeddings of all ok rows (float32, load()'s row order), or None when the store holds none.
        A store with them for some shards only is a StoreError."""
        shards = self.done_shards()
        have = [self.text_path(shard).exists() for shard in shards]
        if not any(have):
            return None
        if not all(have):
            missing = [shard for shard, h in zip(shards, have) if not h]
            raise StoreError(f"store {self.root} has text embeddings for some shards only (none for {missing[:10]})")
        info = self.info()
        parts = []
        for shard in shards:
            path = self.text_path(shard)
            try:
                text = np.load(path, allow_pickle=False)
            except Exception as exc:  # a damaged file: name it
                raise StoreError(f"cannot read {path} (damaged or truncated?): {type(exc).__name__}: {exc}") from exc
            n_ok = int(self.read_marker(shard).get("ok", len(text)))
            if not isinstance(text, np.ndarray) or text.shape != (n_ok, info.dim):
                raise StoreError(f"{path} does not match the shard's {n_ok} ok rows of dim {info.dim}")
            parts.append(text.astype(np.float32))
        return np.concatenate(parts)

    def all_meta(self, where: pl.Expr | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """Meta rows of every finished shard, bad rows included (status != 'ok').

        `where` and `columns` apply shard by shard, so only what they keep is ever held for the whole store.
        """
        metas = []
        for shard in self.done_shards():
            meta = self.read_meta(shard)
            meta = meta if where is None else meta.filter(where)
            metas.append(meta if columns is None else meta.select(columns))
        if metas:
            return pl.concat(metas)
        empty = pl.DataFrame(schema=META_SCHEMA)
        return empty if columns is None else empty.select(columns)

    def fingerprint(self) -> str:
        """A hash of store.json and every shard's metadata, to tie a manifest to the exact input."""
        digest = hashlib.sha256(self.info_path.read_bytes())
        for shard in self.done_shards():
            digest.update(self.meta_path(shard).read_bytes())
        return digest.hexdigest()[:16]


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

