"""Versioned manifests: publication, the latest pointer, changes.parquet, legacy run directories, kills."""
import os

import numpy as np
import polars as pl
import pytest

from pipeline.manifest import ManifestError, read_manifest, read_run_info, write_manifest
from pipeline.versions import (change_counts, format_changes, latest_version, publish, read_changes, version_dir,
                               versions)


def _frame(rows):
    uids, keeps, weights, reasons = zip(*rows)
    return pl.DataFrame({"uid": list(uids), "keep": list(keeps), "weight": np.array(weights, np.float32),
                         "cluster": np.zeros(len(rows), np.int32), "reason": list(reasons)})


def _writer(frame, note):
    def write(folder, version):
        write_manifest(frame, folder, {"note": note, "version": version})
    return write


def test_versions_latest_and_delta(tmp_path):
    run = tmp_path / "run"
    v1 = _frame([("a", True, 1.0, None), ("b", True, 1.0, None), ("c", False, 0.0, "semdedup"), ("d", True, 1.0, None)])
    assert publish(run, _writer(v1, "one")) == 1
    assert read_run_info(run)["note"] == "one"
    assert pl.scan_parquet(run / "manifest.parquet").select(pl.len()).collect().item() == 4  # readers see the latest
    v2 = _frame([("a", False, 0.0, "dbp_quota"), ("b", True, 1.5, None), ("c", True, 1.0, None),
                 ("d", False, 0.0, "missing"), ("e", True, 1.0, None)])
    assert publish(run, _writer(v2, "two")) == 2
    assert latest_version(run) == 2 and versions(run) == [1, 2]
    assert read_manifest(run).height == 5 and read_manifest(version_dir(run, 1)).height == 4  # version 1 still readable
    start, end, changes = read_changes(run)
    assert (start, end) == (1, 2)
    got = {r["uid"]: (r["change"], r["old_reason"], r["new_reason"]) for r in changes.iter_rows(named=True)}
    assert got == {"a": ("kept_to_dropped", None, "dbp_quota"), "b": ("weight_changed", None, None),
                   "c": ("dropped_to_kept", "semdedup", None), "d": ("removed", None, "missing"), "e": ("added", None, None)}
    # the missing row is listed once: a third version without d reports nothing about it
    v3 = v2.filter(pl.col("uid") != "d")
    publish(run, _writer(v3, "three"))
    assert read_changes(run)[2].height == 0
    _, _, across = read_changes(run, from_version=1, to_version=3)
    assert change_counts(across) == {"added": 1, "removed": 1, "kept_to_dropped": 1, "dropped_to_kept": 1, "weight_changed": 1}
    assert "kept_to_dropped" in format_changes(run, 1, 3, across)
    with pytest.raises(ManifestError, match="--from 9"):
        read_changes(run, from_version=9)


def test_kill_before_publication_keeps_previous_and_rerun_gives_same_version(tmp_path):
    run = tmp_path / "run"
    publish(run, _writer(_frame([("a", True, 1.0, None)]), "one"))

    def dying(folder, version):
        write_manifest(_frame([("a", True, 1.0, None), ("b", True, 1.0, None)]), folder, {"note": "two"})
        raise KeyboardInterrupt("killed after writing")

    with pytest.raises(KeyboardInterrupt):
        publish(run, dying)
    assert latest_version(run) == 1 and read_manifest(run).height == 1
    assert publish(run, _writer(_frame([("a", True, 1.0, None), ("b", True, 1.0, None)]), "two")) == 2
    assert not [p for p in (run / "versions").iterdir() if p.name.startswith(".")]


def test_legacy_run_directory_becomes_version_one(tmp_path):
    run = tmp_path / "run"
    write_manifest(_frame([("a", True, 1.0, None)]), run, {"note": "legacy"})
    assert not (run / "manifest.parquet").is_symlink()
    with pytest.raises(ManifestError, match="before manifest versions"):
        read_changes(run)
    publish(run, _writer(_frame([("a", True, 1.0, None), ("b", True, 1.0, None)]), "two"))
    assert versions(run) == [1, 2] and read_run_info(version_dir(run, 1))["note"] == "legacy"
    assert change_counts(read_changes(run)[2])["added"] == 1
    assert os.readlink(run / "latest") == "versions/00002"
