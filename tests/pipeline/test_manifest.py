import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.schema import SCHEMA_VERSION_KEY
from pipeline.manifest import ManifestError, manifest_parts, read_manifest, read_run_info, write_manifest, write_parts_index


def _frame(**changes):
    base = {
        "uid": ["a", "b", "c"],
        "keep": [True, False, False],
        "weight": [1.0, 0.0, 0.0],
        "cluster": [0, 0, -1],
        "reason": [None, "exact_dup", "bad_input"],
        "dup_of": [None, "a", None],
        "score_random": [0.5, 0.1, None],
    }
    base.update(changes)
    return pl.DataFrame(base)


def test_round_trip_types_and_version(tmp_path):
    path = manifest_parts(write_manifest(_frame(), tmp_path / "run", {"note": np.int64(3)}))[0]
    frame = read_manifest(tmp_path / "run")
    assert frame.schema["weight"] == pl.Float32 and frame.schema["cluster"] == pl.Int32
    assert frame.schema["score_random"] == pl.Float32
    assert frame["uid"].to_list() == ["a", "b", "c"]
    assert pq.read_schema(path).metadata[SCHEMA_VERSION_KEY.encode()] == b"1"
    assert read_run_info(tmp_path / "run") == {"note": 3}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"uid": ["a", "a", "c"]}, "duplicate uids"),
        ({"weight": [1.0, 0.5, 0.0]}, "weight 0"),
        ({"reason": [None, None, "bad_input"]}, "no reason"),
        ({"reason": ["el2n", "exact_dup", "bad_input"]}, "carry a drop reason"),
        ({"reason": [None, "because", "bad_input"]}, "unknown reasons"),
        ({"weight": [float("nan"), 0.0, 0.0]}, "finite"),
    ],
)
def test_invalid_manifests_are_refused_and_nothing_written(tmp_path, changes, message):
    with pytest.raises(ManifestError, match=message):
        write_manifest(_frame(**changes), tmp_path / "run", {})
    assert not (tmp_path / "run" / "manifest.parquet").exists()


def test_unknown_column_refused(tmp_path):
    with pytest.raises(ManifestError, match="not in manifest schema"):
        write_manifest(_frame().with_columns(pl.lit(1).alias("extra")), tmp_path / "run", {})


def test_reader_rejects_foreign_and_damaged_files(tmp_path):
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"uid": ["a"]}).write_parquet(plain)
    with pytest.raises(ManifestError, match="not a winnow manifest"):
        read_manifest(plain)
    path = manifest_parts(write_manifest(_frame(), tmp_path / "run", {}))[0]
    table = pq.read_table(path)
    future = table.replace_schema_metadata({SCHEMA_VERSION_KEY.encode(): b"99"})
    pq.write_table(future, tmp_path / "future.parquet")
    with pytest.raises(ManifestError, match="v99"):
        read_manifest(tmp_path / "future.parquet")
    truncated = tmp_path / "trunc.parquet"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(truncated)
    missing = table.drop(["keep"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(missing, tmp_path / "missing.parquet")
    with pytest.raises(ManifestError, match="lacks required columns"):
        read_manifest(tmp_path / "missing.parquet")


def test_failed_rewrite_keeps_previous_manifest(tmp_path):
    write_manifest(_frame(), tmp_path / "run", {"v": 1})
    with pytest.raises(ManifestError):
        write_manifest(_frame(uid=["x", "x", "y"]), tmp_path / "run", {"v": 2})
    assert read_manifest(tmp_path / "run")["uid"].to_list() == ["a", "b", "c"]


def test_parts_read_as_one_table_by_winnow_polars_and_pyarrow(tmp_path):
    frame = _frame(uid=["a", "b", "c"])
    written: list[str] = []

    def recording_fan_out(fn, calls):  # the flow passes its task-runner fan-out here; record what it is given
        written.extend(str(c["path"].name) for c in calls)
        return [fn(**c) for c in calls]

    path = write_manifest(frame, tmp_path / "run", {"v": 1}, rows_per_part=2, fan_out=recording_fan_out)
    assert written == ["part-00000.parquet", "part-00001.parquet"]
    assert [p.name for p in manifest_parts(tmp_path / "run")] == written
    assert read_manifest(tmp_path / "run")["uid"].to_list() == ["a", "b", "c"]
    assert pl.scan_parquet(path).select(pl.len()).collect().item() == 3
    assert pq.read_table(path).num_rows == 3
    # a rewrite with fewer parts replaces the whole directory: no stale part from the first write survives
    write_manifest(_frame(uid=["x", "y", "z"]), tmp_path / "run", {"v": 2})
    assert [p.name for p in manifest_parts(path)] == ["part-00000.parquet"]
    assert read_manifest(path)["uid"].to_list() == ["x", "y", "z"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.parquet", "run.json"]


def test_a_duplicate_uid_across_parts_is_refused_on_read(tmp_path):
    path = write_manifest(_frame(uid=["a", "b", "c"]), tmp_path / "run", {}, rows_per_part=2)
    second = manifest_parts(path)[1]
    first = pq.read_table(manifest_parts(path)[0])
    pq.write_table(first, second)  # part 1 now repeats part 0's rows (a valid file on its own)
    with pytest.raises(ManifestError, match="part-00001.parquet.*_parts.parquet says"):
        read_manifest(path)  # the parts index notices the swap first
    write_parts_index(path)  # as if a buggy writer had indexed it: the rows themselves are still checked
    with pytest.raises(ManifestError, match="duplicate uids"):
        read_manifest(path)


def test_export_copies_parts_then_run_json_to_an_fsspec_url(tmp_path):
    from pipeline.manifest import export_run

    run = tmp_path / "runs" / "exp"
    write_manifest(_frame(uid=["a", "b", "c"]), run, {"v": 1}, rows_per_part=1)
    (run / "report.html").write_text("<html></html>")
    remote = export_run(run, f"file://{tmp_path}/bucket/prefix")
    assert remote == f"file://{tmp_path}/bucket/prefix/exp"
    copy = tmp_path / "bucket" / "prefix" / "exp"
    assert read_manifest(copy).equals(read_manifest(run)) and read_run_info(copy) == {"v": 1}
    assert (copy / "report.html").read_text() == "<html></html>"
    # a later export with fewer parts leaves no stale part behind
    write_manifest(_frame(uid=["x", "y", "z"]), run, {"v": 2})
    export_run(run, f"file://{tmp_path}/bucket/prefix")
    assert [p.name for p in manifest_parts(copy)] == ["part-00000.parquet"]
    assert read_manifest(copy)["uid"].to_list() == ["x", "y", "z"] and read_run_info(copy) == {"v": 2}
    # an unfinished run (no run.json) is not exported
    (run / "run.json").unlink()
    with pytest.raises(ManifestError, match="did not finish"):
        export_run(run, f"file://{tmp_path}/bucket/prefix")
