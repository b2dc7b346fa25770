"""The store's ok rows as the scorers see them: a lazy n × d view of the embeddings plus a few numbers per row."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.atomic import atomic_path
from pipeline.rows import StoreRows
from pipeline.store import EmbeddingStore


@dataclass
class OkRows:
    """Facts about the store's ok rows that scoring needs, as a few numbers per row (no Python object per row).

    Row i of the scorers is the i-th ok row in shard order (the order of StoreRows).
    """

    shards: list[int]  # store shards, in order
    ok_counts: list[int]  # ok rows per shard
    uid_rank: np.ndarray  # int64 rank of each row's uid in string order: the scorers' tie-break, same as the uids
    labels: np.ndarray | None  # object array over the few distinct label strings (8 bytes a row); None without labels
    uid_file: Path  # Arrow IPC file of the rows' uids in row order, memory-mapped to name dup_of originals
    bad_rows: int  # meta rows that are not ok (the manifest's bad_input rows)

    def __len__(self) -> int:
        return len(self.uid_rank)

    def bounds(self, position: int) -> tuple[int, int]:
        """Row range of the `position`-th shard."""
        start = sum(self.ok_counts[:position])
        return start, start + self.ok_counts[position]


def open_rows(store: EmbeddingStore) -> tuple[StoreRows, OkRows]:
    """The store's ok embeddings as a lazy n × d view (nothing read yet) and the ok rows' compact facts.

    Reads every live shard's meta once (checking row counts and widths against the embeddings). Tombstoned rows
    (removed or changed samples of a growing store) are left out: the view then holds the live rows' indices.
    The uids are held as one Arrow string column only while they are ranked and written to
    <store>/index/uids-<fingerprint>.arrow.
    """
    import pyarrow as pa

    store.check_complete()
    info = store.info()
    dead = store.dead_codes()
    shards, paths, counts, uids, labels, bad_rows = [], [], [], [], [], 0
    live_rows: list[np.ndarray] = []  # per shard, the ok rows that are live, as global embedding rows
    total = 0
    for shard, emb, meta in store.iter_shards():
        live = store.live_meta(shard, meta, dead)
        ok = live.filter(pl.col("status") == "ok")
        bad_rows += live.height - ok.height
        shards.append(shard)
        paths.append(store.emb_path(shard))
        counts.append(ok.height)
        uids.append(ok["uid"])
        labels.append(ok["label"])
        live_rows.append(total + ok["emb_row"].to_numpy())
        total += len(emb)
    all_uids = pl.concat(uids) if uids else pl.Series("uid", [], dtype=pl.String)
    del uids
    uid_rank = (all_uids.rank("ordinal").cast(pl.Int64) - 1).to_numpy()
    uid_file = store.root / "index" / f"uids-{store.fingerprint()}.arrow"
    if not uid_file.exists():
        uid_file.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"uid": all_uids.to_arrow()})
        with atomic_path(uid_file) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=1 << 20)
    del all_uids
    label_column = pl.concat(labels) if labels else pl.Series("label", [], dtype=pl.String)
    rows = StoreRows.open(paths, dim=info.dim, dtype=info.dtype)
    if sum(counts) != total:  # tombstones: a view of the live rows only
        rows = rows.subset(np.concatenate(live_rows) if live_rows else np.empty(0, np.int64))
    return rows, OkRows(shards=shards, ok_counts=counts, uid_rank=uid_rank, labels=shared_strings(label_column), uid_file=uid_file,
                      bad_rows=bad_rows)


def shared_strings(column: pl.Series) -> np.ndarray | None:
    """An object array of `column` whose equal strings are one Python object (8 bytes a row for a few distinct
    values, e.g. class labels); None when the column is all null."""
    if column.null_count() == len(column):
        return None
    names = np.array([None, *column.drop_nulls().unique().sort().to_list()], dtype=object)
    codes = column.rank("dense").fill_null(0).cast(pl.Int64).to_numpy()
    return names[codes]


def uids_at(uid_file: Path, rows: np.ndarray) -> list[str]:
    """The uids of the given rows, read through a memory map of open_rows' uid file (only the pages touched)."""
    import pyarrow as pa

    with pa.memory_map(str(uid_file)) as source:
        column = pa.ipc.open_file(source).read_all().column("uid")
        return column.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()
