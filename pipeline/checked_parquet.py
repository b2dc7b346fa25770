"""Parquet files that cannot be damaged silently: a content checksum in the file, verified on read.

Parquet's own page CRCs miss damage to page headers and the footer (row counts, offsets, names), and polars' reader
can abort the whole process on a damaged page (a Rust allocation failure, not an exception). So winnow's own files
(manifests, store metadata shards) are written with a digest of their decoded content in the footer's key-value
metadata and read back with pyarrow, which turns damage into exceptions; the digest is recomputed on read. Any damage
is then either a read error or a digest mismatch, never different rows taken as valid. Files without a digest (written
by older winnow versions or by hand) are read without that check.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DIGEST_KEY = "winnow.content_digest"


def content_digest(table: pa.Table) -> str:
    """A digest of the table's values (column names, nulls, values), independent of how Arrow lays them out.

    Strings hash the same whether Arrow holds them as string, large_string or string_view, so a table written from
    polars and read back by pyarrow gives the same digest.
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(f"rows={table.num_rows};".encode())
    for name in sorted(table.column_names):
        h.update(f"col={name};".encode())
        _hash_array(h, table.column(name).combine_chunks())
    return h.hexdigest()


def _hash_array(h, arr: pa.Array) -> None:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    has_nulls = arr.null_count > 0
    if has_nulls:
        h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    else:
        h.update(b"no-nulls")
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        filled = arr if pa.types.is_large_string(t) else arr.cast(pa.large_string())
        h.update(b"str")
        _hash_binary(h, pc.fill_null(filled, "") if has_nulls else filled)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        filled = arr if pa.types.is_large_binary(t) else arr.cast(pa.large_binary())
        h.update(b"bin")
        _hash_binary(h, pc.fill_null(filled, b"") if has_nulls else filled)
    elif pa.types.is_boolean(t):
        h.update(b"bool")
        h.update(np.packbits((pc.fill_null(arr, False) if has_nulls else arr).to_numpy(zero_copy_only=False)).tobytes())
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        h.update(str(t).encode())
        values = (pc.fill_null(arr, 0) if has_nulls else arr).to_numpy(zero_copy_only=False)
        h.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    elif pa.types.is_null(t):
        h.update(b"null")
    else:  # nested or temporal types: not in winnow's schemas; slow but exact
        h.update(str(t).encode())
        h.update(repr(arr.to_pylist()).encode())


def _hash_binary(h, arr: pa.Array) -> None:
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    if len(offsets) == 0:
        return
    h.update((offsets - offsets[0]).tobytes())
    if data_buf is not None:
        h.update(memoryview(data_buf)[int(offsets[0]) : int(offsets[-1])])


def with_digest(table: pa.Table, extra: dict[str, str] | None = None) -> pa.Table:
    """The table with its content digest (and `extra` entries) added to the schema's key-value metadata."""
    meta = dict(table.schema.metadata or {})
    for key, value in (extra or {}).items():
        meta[key.encode()] = value.encode()
    meta[DIGEST_KEY.encode()] = content_digest(table).encode()
    return table.replace_schema_metadata(meta)


def write_checked(table: pa.Table, path: str | Path, *, extra: dict[str, str] | None = None, compression: str = "zstd") -> None:
    """Writes `table` with its content digest and page checksums (the caller makes it atomic)."""
    pq.write_table(with_digest(table, extra), path, compression=compression, write_page_checksum=True)


def read_checked(path: str | Path, error: type[ValueError], *, verify: bool = True) -> pa.Table:
    """Reads a Parquet file with pyarrow and (unless verify=False) verifies its content digest when it has one.

    Raises `error` (a ValueError subclass) naming the file for anything unreadable or damaged. With verify=False
    the caller checks structure first (for a clearer message on a hand-edited file) and calls verify_digest after.
    """
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        table.validate(full=True)
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist") from exc
    except Exception as exc:  # ArrowInvalid, OSError, UnicodeDecodeError, ...: all mean a damaged or foreign file
        raise error(f"{path} is not a readable Parquet file (damaged or truncated?): {type(exc).__name__}: {exc}") from exc
    if verify:
        verify_digest(table, path, error)
    return table


def verify_digest(table: pa.Table, path: str | Path, error: type[ValueError]) -> None:
    """Raises `error` when the table carries a content digest that its values do not match."""
    stored = (table.schema.metadata or {}).get(DIGEST_KEY.encode())
    if stored is None:
        return
    try:
        actual = content_digest(table)
    except Exception as exc:  # e.g. a column name that is not valid UTF-8
        raise error(f"{path} is damaged: {type(exc).__name__}: {exc}") from exc
    if stored.decode("ascii", "replace") != actual:
        raise error(f"{path} is damaged: its content does not match the checksum written with it")


def to_polars(table: pa.Table, path: str | Path, error: type[ValueError]):
    """A polars DataFrame of the table's columns, without the file's schema metadata.

    The metadata is dropped first (it is not data, and polars panics on metadata that is not valid UTF-8); a polars
    panic, which is not an Exception, becomes `error` too.
    """
    import polars as pl

    try:
        bare = pa.Table.from_arrays(table.columns, names=table.column_names)
        return pl.from_arrow(bare)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        raise error(f"{path} holds columns that cannot be read: {type(exc).__name__}: {exc}") from exc
