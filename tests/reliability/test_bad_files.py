"""Damaged and foreign files given to the manifest and store readers: one clear error each, never wrong rows taken as valid.

Every file here is written by winnow's own writers, then damaged on disk (truncated, bytes flipped or overwritten,
a column dropped, a version changed, NaN written into embeddings, ...). The property for random damage: the reader
either raises its ValueError subclass naming the damaged file, or returns exactly what was written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifests.schema import SCHEMA_VERSION_KEY
from pipeline.checked_parquet import DIGEST_KEY
from pipeline.manifest import ManifestError, manifest_parts, read_manifest, read_run_info, write_manifest
from pipeline.store import EmbeddingStore, StoreError

from ._helpers import make_store, manifest_frame, meta_rows, write_run

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- damage strategies ----------------------------------------------------------------------------------------------
@st.composite
def damage(draw, size: int, *, lo: int = 0, hi: int | None = None):
    """(kind, details) for a file of `size` bytes: truncation, a few flipped bytes, or an overwritten span in [lo, hi)."""
    hi = size if hi is None else min(hi, size)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=4))
        return kind, flips
    start = draw(st.integers(lo, hi - 1))
    junk = draw(st.binary(min_size=1, max_size=32))[: hi - start]  # the span stays inside [lo, hi)
    return kind, (start, junk)


def apply_damage(data: bytes, how) -> bytes:
    kind, details = how
    if kind == "truncate":
        return data[:details]
    out = bytearray(data)
    if kind == "flip":
        for pos, mask in details:
            out[pos] ^= mask
    else:
        start, junk = details
        out[start : start + len(junk)] = junk
        out = out[: len(data)]
    return bytes(out)


# ---- manifest ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_manifest(tmp_path_factory) -> tuple[bytes, pl.DataFrame]:
    run = tmp_path_factory.mktemp("good") / "run"
    path = write_run(run)
    return path.read_bytes(), read_manifest(path)


@FUZZ
@given(data=st.data())
def test_damaged_manifest_is_an_error_naming_it_or_reads_back_unchanged(good_manifest, tmp_path, data):
    original, frame = good_manifest
    how = data.draw(damage(len(original)))
    path = tmp_path / "manifest.parquet"
    damaged = apply_damage(original, how)
    path.write_bytes(damaged)
    try:
        got = read_manifest(path)
    except ManifestError as exc:
        assert str(path) in str(exc)
        return
    # no error: then it must be exactly what was written (the damage hit bytes that carry no data, e.g. statistics)
    assert damaged != original or how[0] != "truncate"
    assert got.equals(frame)


def test_truncated_manifest(tmp_path):
    path = write_run(tmp_path / "run")
    data = path.read_bytes()
    for cut in (0, 4, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ManifestError, match="not a readable Parquet") as err:
            read_manifest(path)
        assert str(path) in str(err.value)


def test_manifest_data_damage_that_parquet_itself_misses_is_caught(tmp_path):
    """A changed value with intact pages (as a bad disk or a careless tool leaves it): the content checksum catches it."""
    path = write_run(tmp_path / "run")
    table = pq.read_table(path)
    weights = table.column("weight").to_numpy().copy()
    weights[1] *= 2  # still a valid manifest (finite, >= 0, kept row), just not the one written
    tampered = table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(weights, pa.float32()))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ManifestError, match="does not match the checksum") as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_manifest_wrong_schema_version(tmp_path):
    path = write_run(tmp_path / "run")
    table = pq.read_table(path)
    for version, message in ((b"2", "schema v2; this winnow reads v1"), (b"one", "unreadable schema version")):
        meta = {**table.schema.metadata, SCHEMA_VERSION_KEY.encode(): version}
        pq.write_table(table.replace_schema_metadata(meta), path)
        with pytest.raises(ManifestError, match=message) as err:
            read_manifest(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("column", ["uid", "keep", "weight", "cluster", "reason"])
def test_manifest_missing_required_column(tmp_path, column):
    path = write_run(tmp_path / "run")
    table = pq.read_table(path)
    pq.write_table(table.drop([column]).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ManifestError, match=rf"lacks required columns \['{column}'\]") as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_manifest_rule_violation_names_the_file(tmp_path):
    """A hand-made file (no checksum) that breaks a schema rule: the message names the file and the rule."""
    table = pl.DataFrame(
        {"uid": ["a", "b"], "keep": [True, False], "weight": [1.0, float("inf")], "cluster": [0, 0], "reason": [None, "el2n"]},
        schema={"uid": pl.String, "keep": pl.Boolean, "weight": pl.Float32, "cluster": pl.Int32, "reason": pl.String},
    ).to_arrow()
    path = tmp_path / "handmade.parquet"
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY.encode(): b"1"}), path)
    with pytest.raises(ManifestError, match="weight must be finite") as err:
        read_manifest(path)
    assert str(path) in str(err.value)


def test_damaged_run_json(tmp_path):
    write_run(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text('{"config": ')
    with pytest.raises(ManifestError, match="run.json is not valid JSON"):
        read_run_info(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        read_run_info(tmp_path / "run")


def test_leftover_temp_files_are_never_taken_for_a_manifest(tmp_path):
    """What a crash mid-write leaves behind (a hidden temp file, no manifest, no run.json) is not a finished run."""
    run = tmp_path / "run"
    path = write_run(tmp_path / "other")
    run.mkdir()
    (run / ".manifest.parquet.0badf00d.tmp").write_bytes(path.read_bytes())
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(run)
    with pytest.raises(ManifestError, match="did not finish"):
        read_run_info(run)


# ---- embedding store ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> tuple[Path, np.ndarray, pl.DataFrame]:
    root = tmp_path_factory.mktemp("store") / "s"
    store = make_store(root)
    emb, meta = store.load()
    return root, emb, meta


@FUZZ
@given(data=st.data())
def test_damaged_meta_shard_is_an_error_naming_it_or_reads_back_unchanged(good_store, tmp_path, data):
    root, emb, meta = good_store
    copy = tmp_path / "s"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(root, copy)
    store = EmbeddingStore(copy)
    target = store.meta_path(1)
    original = target.read_bytes()
    target.write_bytes(apply_damage(original, data.draw(damage(len(original)))))
    try:
        got_emb, got_meta = store.load()
    except StoreError as exc:
        assert str(target) in str(exc)
        return
    assert np.array_equal(got_emb, emb) and got_meta.equals(meta)


@FUZZ
@given(data=st.data())
def test_damaged_embedding_file_header_or_length_is_an_error_naming_it(good_store, tmp_path, data):
    """Truncation anywhere, or damage inside the .npy header (magic, dtype, shape). Value bits inside the data block
    carry no checksum (see README): only NaN/Inf there is detected (next test)."""
    root, emb, meta = good_store
    copy = tmp_path / "s"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(root, copy)
    store = EmbeddingStore(copy)
    target = store.emb_path(0)
    original = target.read_bytes()
    header_len = len(original) - emb[:5].nbytes  # shard 0 holds the first 5 ok rows
    target.write_bytes(apply_damage(original, data.draw(damage(len(original), hi=header_len))))
    try:
        got_emb, got_meta = store.load()
    except StoreError as exc:
        assert str(target) in str(exc) or "shard 0" in str(exc)
        return
    assert np.array_equal(got_emb, emb) and got_meta.equals(meta)


def test_every_single_bit_flip_in_the_npy_header_is_an_error_or_harmless(good_store, tmp_path):
    """Exhaustive over the header's bits. CI's fuzzing once found flip (8, 16): the header-length field shrunk into the
    header's space padding, numpy parsed it and read the padding as data (0x2020 = 8.057e-03 everywhere)."""
    root, emb, meta = good_store
    copy = tmp_path / "s"
    shutil.copytree(root, copy)
    store = EmbeddingStore(copy)
    target = store.emb_path(0)
    original = target.read_bytes()
    header_len = len(original) - emb[:5].nbytes
    silent = []
    for pos in range(header_len):
        for bit in range(8):
            target.write_bytes(apply_damage(original, ("flip", [(pos, 1 << bit)])))
            try:
                got_emb, got_meta = store.load()
            except StoreError as exc:
                assert str(target) in str(exc) or "shard 0" in str(exc)
                continue
            if not (np.array_equal(got_emb, emb) and got_meta.equals(meta)):
                silent.append((pos, 1 << bit))
    assert silent == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_nan_or_inf_in_embeddings(tmp_path, bad, dtype):
    store = make_store(tmp_path / "s", dtype=dtype)
    emb = np.load(store.emb_path(1))
    emb[2, 3] = bad
    np.save(store.emb_path(1), emb)
    with pytest.raises(StoreError, match=r"NaN or Inf embeddings \(shard 1\)"):
        store.load()


def test_wrong_dimension(tmp_path):
    store = make_store(tmp_path / "s", dim=8)
    emb = np.load(store.emb_path(0))
    np.save(store.emb_path(0), np.concatenate([emb, emb[:, :1]], axis=1))  # 9 columns in a dim-8 store
    with pytest.raises(StoreError, match="shard 0: embeddings of shape \\(5, 9\\).*dim 8"):
        store.load()


def test_wrong_dtype_and_not_a_matrix(tmp_path):
    store = make_store(tmp_path / "s", dtype="float16")
    emb = np.load(store.emb_path(0))
    np.save(store.emb_path(0), emb.astype(np.float32))
    with pytest.raises(StoreError, match="holds float32, the store says float16"):
        store.load()
    np.save(store.emb_path(0), emb.astype(np.float64))
    with pytest.raises(StoreError, match="2-d float16 or float32"):
        store.load()
    np.save(store.emb_path(0), emb.ravel())
    with pytest.raises(StoreError, match="2-d float16 or float32") as err:
        store.load()
    assert str(store.emb_path(0)) in str(err.value)


def test_mismatched_row_counts(tmp_path):
    store = make_store(tmp_path / "s")
    # more embedding rows than ok meta rows
    emb = np.load(store.emb_path(1))
    np.save(store.emb_path(1), np.concatenate([emb, emb[:1]]))
    with pytest.raises(StoreError, match="shard 1: embeddings of shape \\(6, 8\\) .* do not match 5 ok meta rows"):
        store.load()
    np.save(store.emb_path(1), emb)
    store.load()  # restored
    # a meta row added that is not 'ok': embeddings still line up, but the shard is not the one written
    meta = store.read_meta(1)
    extra = pl.DataFrame(meta_rows(["s1/999"], ["corrupt"]), schema=meta.schema)
    pl.concat([meta, extra]).write_parquet(store.meta_path(1))
    with pytest.raises(StoreError, match="has 7 rows \\(5 ok\\) but its completion marker says 6 \\(5 ok\\)"):
        store.load()


def test_meta_missing_column_or_wrong_type(tmp_path):
    store = make_store(tmp_path / "s")
    meta = store.read_meta(0)
    meta.drop("status").write_parquet(store.meta_path(0))
    with pytest.raises(StoreError, match=r"lacks the columns \['status'\]") as err:
        store.load()
    assert str(store.meta_path(0)) in str(err.value)
    meta.with_columns(pl.col("width").cast(pl.String)).write_parquet(store.meta_path(0))
    with pytest.raises(StoreError, match="width is String, expected Int32"):
        store.load()


def test_store_json_wrong_version_or_damaged(tmp_path):
    store = make_store(tmp_path / "s")
    good = json.loads(store.info_path.read_text())
    cases = [
        ({**good, "format_version": 3}, r"store format version 3; this winnow reads versions 1, 2 \(written by a newer winnow"),
        ({k: v for k, v in good.items() if k != "format_version"}, r"store format version None; .* \(delete the store"),
        ({**good, "dim": "8"}, "dim '8' is not a positive integer"),
        ({**good, "dtype": "int8"}, "dtype 'int8' is not float16 or float32"),
        ({**good, "n_shards": -1}, "n_shards -1"),
        ({k: v for k, v in good.items() if k != "dim"}, "lacks the field 'dim'"),
        ([good], "must hold a JSON object"),
    ]
    for content, message in cases:
        store.info_path.write_text(json.dumps(content))
        with pytest.raises(StoreError, match=message) as err:
            store.load()
        assert str(store.info_path) in str(err.value)
    store.info_path.write_bytes(b"\xff\xfe{")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.info()


def test_completion_markers_damaged_or_beyond_the_store(tmp_path):
    store = make_store(tmp_path / "s")
    store.done_path(0).write_text("{not json")
    with pytest.raises(StoreError, match="completion marker .*00000 is damaged"):
        store.load()
    store.done_path(0).write_text(json.dumps({"rows": 6, "ok": 5}))
    store.load()
    store.done_path(7).write_text(json.dumps({"rows": 6, "ok": 5}))
    with pytest.raises(StoreError, match=r"completion markers for shards \[7\] beyond its n_shards"):
        store.load()


def test_leftover_temp_files_do_not_count_as_shards(tmp_path):
    """A crash mid-write leaves hidden temp files and no marker: the shard is not done and the store incomplete."""
    store = make_store(tmp_path / "s", n_shards=3)
    store.done_path(2).unlink()
    for path in (store.emb_path(2), store.meta_path(2)):
        path.rename(path.with_name(f".{path.name}.deadbeef.tmp"))
    assert store.done_shards() == [0, 1]
    with pytest.raises(StoreError, match=r"incomplete: shards \[2\] not done"):
        store.load()


def test_written_meta_carries_a_checksum_and_a_tampered_value_is_caught(tmp_path):
    store = make_store(tmp_path / "s")
    table = pq.read_table(store.meta_path(0))
    assert DIGEST_KEY.encode() in table.schema.metadata
    uids = table.column("uid").to_pylist()
    uids[0] = "s0/evil"
    tampered = table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids, table.schema.field("uid").type))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), store.meta_path(0))
    with pytest.raises(StoreError, match="does not match the checksum"):
        store.load()


def test_meta_without_checksum_from_older_stores_still_reads(tmp_path):
    store = make_store(tmp_path / "s")
    emb, meta = store.load()
    for shard in (0, 1):
        store.read_meta(shard).write_parquet(store.meta_path(shard))  # polars, no winnow checksum, as before
    emb2, meta2 = store.load()
    assert np.array_equal(emb, emb2) and meta.equals(meta2)


def test_manifest_round_trip_keeps_rows_and_writes_checksum(tmp_path):
    path = manifest_parts(write_manifest(manifest_frame(), tmp_path / "run", {}))[0]
    assert DIGEST_KEY.encode() in pq.read_schema(path).metadata
    assert read_manifest(path)["uid"].to_list() == manifest_frame()["uid"].to_list()
