"""A manifest directory knows its parts (#18): the parts index written last, checked by every reader."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main
from pipeline.manifest import (
    PARTS_FILE,
    PARTS_KEY,
    ManifestError,
    export_run,
    manifest_parts,
    read_manifest,
    read_parts_index,
    write_manifest,
)


def _frame(n: int) -> pl.DataFrame:
    keep = [i % 3 != 0 for i in range(n)]
    return pl.DataFrame({
        "uid": [f"{i:03d}.png" for i in range(n)],
        "keep": keep,
        "weight": [1.0 if k else 0.0 for k in keep],
        "cluster": [i % 4 for i in range(n)],
        "reason": [None if k else "random" for k in keep],
        "label": ["a" if i % 2 else "b" for i in range(n)],
        "location": [f"{i:03d}.png" for i in range(n)],
    })


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory with 4 manifest parts of 10, 10, 10 and 2 rows; an image folder source behind it."""
    images = tmp_path / "images"
    images.mkdir()
    frame = _frame(32)
    for uid in frame["uid"]:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG")
        (images / uid).write_bytes(buf.getvalue())
    frame = frame.with_columns(pl.col("location").map_elements(lambda u: str(images / u), return_dtype=pl.String))
    run_dir = tmp_path / "run"
    info = {"config": {"source": {"kind": "image_folder", "root": str(images)}}, "counts": {"samples": 32, "kept": 21,
            "by_reason": {"kept": 21, "random": 11}}, "timings_s": {}}
    write_manifest(frame, run_dir, info, rows_per_part=10)
    return run_dir


def test_the_index_lists_every_part_and_polars_still_reads_the_directory(run: Path) -> None:
    directory = run / "manifest.parquet"
    entries = read_parts_index(directory)
    assert [(e["name"], e["rows"]) for e in entries] == [
        ("part-00000.parquet", 10), ("part-00001.parquet", 10), ("part-00002.parquet", 10), ("part-00003.parquet", 2)]
    assert all(e["bytes"] == (directory / e["name"]).stat().st_size and len(e["digest"]) == 40 for e in entries)
    assert json.loads(pq.read_schema(directory / PARTS_FILE).metadata[PARTS_KEY.encode()])["rows"] == 32
    # the index is a zero-row file with the parts' schema: every reader of the directory sees the 32 rows only
    assert pl.scan_parquet(directory).select(pl.len()).collect().item() == 32
    assert pl.read_parquet(directory).sort("uid").equals(read_manifest(run).sort("uid"))
    assert pq.read_table(directory).num_rows == 32


def test_a_deleted_part_fails_validate_and_every_reader_naming_it(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "manifest.parquet" / "part-00001.parquet").unlink()
    for reader in (read_manifest, manifest_parts):
        with pytest.raises(ManifestError, match=r"missing part\(s\) \['part-00001.parquet'\]"):
            reader(run)
    for argv in (["validate", str(run)], ["validate", str(run / "manifest.parquet")], ["summary", str(run)],
                 ["validate", str(run / "manifest.parquet" / "part-00000.parquet")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("winnow: error:") and "part-00001.parquet" in err, (argv, err)


def test_manifest_dataset_and_report_refuse_a_manifest_missing_a_part(run: Path) -> None:
    pytest.importorskip("torch")
    from pipeline.loader import ManifestDataset
    from pipeline.report import write_report

    assert len(ManifestDataset(run)) == 21  # whole: every kept row
    (run / "manifest.parquet" / "part-00002.parquet").unlink()
    with pytest.raises(ManifestError, match="part-00002.parquet"):
        ManifestDataset(run)  # never trains on a subset without a word
    with pytest.raises(ManifestError, match="part-00002.parquet"):
        write_report(run)


def test_extra_replaced_or_unindexed_parts_are_errors(run: Path, tmp_path: Path) -> None:
    directory = run / "manifest.parquet"
    shutil.copy(directory / "part-00000.parquet", directory / "part-00009.parquet")
    with pytest.raises(ManifestError, match=r"unlisted file\(s\) \['part-00009.parquet'\]"):
        read_manifest(run)
    (directory / "part-00009.parquet").unlink()
    (directory / "notes.txt").write_text("polars would trip over this too")
    with pytest.raises(ManifestError, match="notes.txt"):
        read_manifest(run)
    (directory / "notes.txt").unlink()
    # a part swapped for another valid part (same name, other rows): size, rows or digest differ from the index
    other = tmp_path / "other"
    write_manifest(_frame(12).filter(pl.col("uid") >= "002"), other, {}, rows_per_part=10)
    shutil.copy(other / "manifest.parquet" / "part-00000.parquet", directory / "part-00000.parquet")
    with pytest.raises(ManifestError, match="part-00000.parquet.*says"):
        read_manifest(run)


def test_missing_or_damaged_index(run: Path) -> None:
    index = run / "manifest.parquet" / PARTS_FILE
    saved = index.read_bytes()
    index.unlink()
    with pytest.raises(ManifestError, match="has no _parts.parquet.*did not finish"):
        read_manifest(run)
    index.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ManifestError, match="damaged or not a winnow parts index"):
        read_manifest(run)
    with pytest.raises(ManifestError, match="parts index, not a part"):
        read_manifest(index)


def test_export_copies_the_index_and_the_copy_is_checked(run: Path, tmp_path: Path) -> None:
    export_run(run, f"file://{tmp_path}/bucket")
    copy = tmp_path / "bucket" / "run"
    assert read_parts_index(copy / "manifest.parquet") == read_parts_index(run / "manifest.parquet")
    assert read_manifest(copy).equals(read_manifest(run))
    (copy / "manifest.parquet" / "part-00003.parquet").unlink()
    with pytest.raises(ManifestError, match="part-00003.parquet"):
        read_manifest(copy)
