"""Incremental curation end to end on real images (sklearn's digits as PNG files, the pixels embedder):
a grown folder, the issue's silent-wrong rerun (50 added, 3 deleted, 3 rewritten), embedder identity, append mode's
stable decisions and cross-run duplicates, versions and their delta, and a SIGKILL mid-increment."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from flows.demo import write_digits
from pipeline.config import CurateConfig
from pipeline.manifest import read_manifest, read_run_info
from pipeline.stages import run_in_process
from pipeline.store import EmbeddingStore, StoreError
from pipeline.versions import latest_version, read_changes, version_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "all"
    write_digits(root)
    return root


def _folder(digits: Path, dest: Path, n: int, start: int = 0) -> list[str]:
    """Copies n digit files (sorted uid order from `start`) into dest, keeping class folders; returns their uids."""
    files = sorted(p.relative_to(digits).as_posix() for p in digits.rglob("*.png"))[start:start + n]
    for uid in files:
        (dest / uid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(digits / uid, dest / uid)
    return files


def _cfg(root: Path, out: Path, **over) -> CurateConfig:
    raw = {
        "name": "incr",
        "source": {"kind": "image_folder", "root": str(root)},
        "embed": {"kind": "pixels", "shard_size": 500, "num_workers": 0, "pixels": {"size": 8, "grey": True, "dim": 16}},
        "index": {"k": 5},
        "steps": [{"scorer": "exact_dup"}],
        "output_root": str(out),
        "report": False,
    }
    for key, value in over.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return CurateConfig.model_validate(raw)


def test_grown_folder_with_other_shard_count_is_curated(digits, tmp_path):
    """Issue bug 1: 120 images at shard_size 30, then 30 added: no n_shards error, only the 30 are embedded."""
    root = tmp_path / "data"
    _folder(digits, root, 120)
    cfg = _cfg(root, tmp_path / "runs", **{"embed.shard_size": 30})
    info = run_in_process(cfg)
    assert info["counts"]["samples"] == 120 and info["incremental"]["source_changes"]["new"] == 120
    _folder(digits, root, 30, start=120)
    info = run_in_process(cfg)
    changes = info["incremental"]["source_changes"]
    assert changes == {"new": 30, "changed": 0, "removed": 0, "unchanged": 120}
    assert info["counts"]["samples"] == 150 and read_manifest(cfg.run_dir).height == 150
    store = EmbeddingStore(cfg.store_path)
    assert store.shards() == [0, 1, 2, 3, 4]  # 4 old shards untouched, one new shard of 30
    assert store.read_meta(4).height == 30
    assert info["version"] == 2 and info["delta"]["added"] == 30


def test_added_deleted_and_rewritten_files_are_all_seen(digits, tmp_path):
    """Issue bug 2: 300 images at shard_size 500, then 50 added, 3 deleted, 3 rewritten: the manifest lists the 50 new
    ones, the 3 deleted ones as `missing`, and the 3 rewritten ones with their new embeddings."""
    root = tmp_path / "data"
    uids = _folder(digits, root, 300)
    cfg = _cfg(root, tmp_path / "runs")
    run_in_process(cfg)
    store = EmbeddingStore(cfg.store_path)
    old_emb, old_meta = store.load()
    added = _folder(digits, root, 50, start=300)
    deleted, rewritten = uids[:3], uids[10:13]
    for uid in deleted:
        (root / uid).unlink()
    for uid in rewritten:  # another real digit's pixels under the same name
        Image.open(digits / added[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / uid)
    info = run_in_process(cfg)
    assert info["incremental"]["source_changes"] == {"new": 50, "changed": 3, "removed": 3, "unchanged": 294}
    manifest = read_manifest(cfg.run_dir)
    assert manifest.height == 350  # 347 live (294 unchanged, 50 new, 3 rewritten) + 3 missing
    assert set(added) <= set(manifest["uid"])
    gone = manifest.filter(pl.col("reason") == "missing")
    assert sorted(gone["uid"]) == sorted(deleted) and not gone["keep"].any()
    emb, meta = store.load()
    assert meta.height == 347 and meta["uid"].n_unique() == 347
    for uid in rewritten:  # a new embedding, not the old one
        old = old_emb[old_meta["uid"].to_list().index(uid)]
        new = emb[meta["uid"].to_list().index(uid)]
        assert not np.allclose(old, new)
    _, _, delta = read_changes(cfg.run_dir)
    counts = dict(delta.group_by("change").len().iter_rows())
    assert counts.get("added") == 50 and counts.get("removed") == 3
    assert sorted(delta.filter(pl.col("change") == "removed")["new_reason"].unique()) == ["missing"]
    # version 1 stays readable and unchanged
    assert read_manifest(version_dir(cfg.run_dir, 1)).height == 300


def test_other_pixels_settings_are_refused_by_name(digits, tmp_path):
    """Issue bug 3: --set embed.pixels.dim=8 after a dim-16 run must not reuse the 16-d store."""
    root = tmp_path / "data"
    _folder(digits, root, 60)
    cfg = _cfg(root, tmp_path / "runs")
    run_in_process(cfg)
    with pytest.raises(StoreError, match=r"embed\.pixels\.dim: 16 → 8"):
        run_in_process(_cfg(root, tmp_path / "runs", **{"embed.pixels.dim": 8}))
    with pytest.raises(StoreError, match=r"embed\.pixels\.size: 8 → 12"):
        run_in_process(_cfg(root, tmp_path / "runs", **{"embed.pixels.size": 12}))
    with pytest.raises(StoreError, match=r"dtype: float16 → float32"):
        run_in_process(_cfg(root, tmp_path / "runs", **{"embed.dtype": "float32"}))
    # the CLI says it in one line, exit status 2
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--set", "embed.pixels.dim=32"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PREFECT_HOME": str(tmp_path / "ph")}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("winnow: error:")]
    assert len(lines) == 1 and "embed.pixels.dim: 16 → 32" in lines[0]


def test_append_keeps_decisions_and_drops_cross_run_duplicates(digits, tmp_path):
    root = tmp_path / "data"
    uids = _folder(digits, root, 300)
    steps = [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.002}, {"scorer": "random", "keep_fraction": 0.5}]
    cfg = _cfg(root, tmp_path / "runs", steps=steps, **{"incremental": {"mode": "append"}})
    first = run_in_process(cfg)
    assert first["incremental"]["fallback"].startswith("no earlier version")
    before = read_manifest(cfg.run_dir).sort("uid")
    kept_old = before.filter(pl.col("keep"))["uid"].to_list()
    # new data: 40 fresh digits, an exact copy of an old kept file, a near copy (one pixel changed) of another
    added = _folder(digits, root, 40, start=300)
    exact_uid = f"{Path(kept_old[0]).parent}/copy-exact.png"
    near_uid = f"{Path(kept_old[1]).parent}/copy-near.png"
    (root / exact_uid).write_bytes((root / kept_old[0]).read_bytes())
    near = np.array(Image.open(root / kept_old[1]))
    near[0, 0] = min(255, int(near[0, 0]) + 1)
    Image.fromarray(near).save(root / near_uid)
    info = run_in_process(cfg)
    assert info["incremental"]["mode"] == "append" and info["incremental"]["new_rows"] == 42
    after = read_manifest(cfg.run_dir)
    old_after = after.filter(pl.col("uid").is_in(uids)).sort("uid")
    assert old_after.select("uid", "keep", "weight", "reason", "cluster").equals(before.select("uid", "keep", "weight", "reason", "cluster"))
    row = after.filter(pl.col("uid") == exact_uid).row(0, named=True)
    assert (row["reason"], row["dup_of"]) == ("exact_dup", kept_old[0])
    row = after.filter(pl.col("uid") == near_uid).row(0, named=True)
    assert (row["reason"], row["dup_of"]) == ("semdedup", kept_old[1])
    new_rows = after.filter(pl.col("uid").is_in(added))
    assert new_rows.filter(pl.col("keep")).height == round(0.5 * 42)  # the budget applies to the new rows
    _, _, delta = read_changes(cfg.run_dir)
    assert set(delta["change"]) == {"added"} and delta.height == 42  # append never changes an earlier decision
    refit = run_in_process(_cfg(root, tmp_path / "runs", steps=steps, **{"incremental": {"mode": "append", "refit": True}}))
    assert refit["incremental"]["fallback"] == "refit requested" and refit["version"] == 3


def _run_subprocess(cfg: CurateConfig, tmp: Path, failpoint: str | None) -> int:
    import yaml

    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "WINNOW_FAILPOINT"}
    env["PYTHONPATH"] = str(REPO)
    if failpoint:
        env["WINNOW_FAILPOINT"] = failpoint
    code = ("import sys; from pipeline.config import load_config; from pipeline.stages import run_in_process; "
            "run_in_process(load_config(sys.argv[1]))")
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, timeout=300).returncode


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["embed_shard:2", "store_commit", "manifest_commit", "version_publish"])
def test_kill_mid_increment_then_rerun_gives_the_same_version(digits, tmp_path, failpoint):
    root = tmp_path / "data"
    _folder(digits, root, 200)
    cfg = _cfg(root, tmp_path / "runs", **{"embed.shard_size": 20},
               steps=[{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.01}, {"scorer": "dbp", "keep_fraction": 0.5}])
    run_in_process(cfg)
    _folder(digits, root, 60, start=200)
    (root / sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[0]).unlink()
    twin = tmp_path / "twin"  # the same state, incremented without a kill
    shutil.copytree(tmp_path / "runs", twin / "runs", symlinks=True)
    twin_cfg = cfg.model_copy(update={"output_root": twin / "runs"})
    run_in_process(twin_cfg)
    expected = read_manifest(twin_cfg.run_dir).sort("uid")

    assert _run_subprocess(cfg, tmp_path, failpoint) == -9  # SIGKILLed
    assert latest_version(cfg.run_dir) == 1 and read_manifest(cfg.run_dir).height == 200  # version 1 still in force
    assert _run_subprocess(cfg, tmp_path, None) == 0
    assert latest_version(cfg.run_dir) == 2
    got = read_manifest(cfg.run_dir).sort("uid")
    assert got.equals(expected)
    info = read_run_info(cfg.run_dir)
    assert info["incremental"]["source_changes"] == read_run_info(twin_cfg.run_dir)["incremental"]["source_changes"]
    assert info["delta"] == read_run_info(twin_cfg.run_dir)["delta"]


def test_append_links_untouched_parts_and_matches_a_full_rewrite(digits, tmp_path, monkeypatch):
    """An append run links the previous version's part of every shard it did not touch (no new rows, no tombstone);
    the version it publishes (every column) and its delta equal those of the same run by pipeline.append's path,
    which reads every row and writes every part, and the earlier version stays readable. DBP's quotas for the new
    rows come from the complexity version 1 stored."""
    import pipeline.run_record as run_record
    import pipeline.sequence as sequence

    root = tmp_path / "data"
    _folder(digits, root, 300)
    steps = [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.002}, {"scorer": "dbp", "keep_fraction": 0.5}]
    cfg = _cfg(root, tmp_path / "runs", steps=steps, **{"embed.shard_size": 100, "incremental": {"mode": "append"}})
    run_in_process(cfg)
    run_in_process(cfg)  # version 2: nothing changed, every part linked
    v1_parts = sorted((version_dir(cfg.run_dir, 1) / "manifest.parquet").glob("part-*.parquet"))
    v2_parts = sorted((version_dir(cfg.run_dir, 2) / "manifest.parquet").glob("part-*.parquet"))
    assert len(v1_parts) == 3 and [p.stat().st_ino for p in v1_parts] == [p.stat().st_ino for p in v2_parts]
    assert read_run_info(cfg.run_dir)["delta"]["added"] == 0
    _folder(digits, root, 40, start=300)
    (root / sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[0]).unlink()  # a tombstone in one old shard
    twin = tmp_path / "twin"
    shutil.copytree(tmp_path / "runs", twin / "runs", symlinks=True)
    twin_cfg = cfg.model_copy(update={"output_root": twin / "runs"})
    info = run_in_process(cfg)
    assert "index" not in info["timings_s"]  # decided by shard (pipeline.append_shards): no k-means, no open rows
    v3_parts = sorted((version_dir(cfg.run_dir, 3) / "manifest.parquet").glob("part-*.parquet"))
    linked = [p.stat().st_ino for p in v3_parts]
    assert sum(i in {p.stat().st_ino for p in v2_parts} for i in linked) == 2  # the shard with a tombstone is rewritten
    monkeypatch.setattr(run_record, "reusable_parts", lambda *a, **k: {})
    monkeypatch.setattr(sequence, "append_by_shard", lambda *a, **k: None)
    twin_info = run_in_process(twin_cfg)
    assert "index" in twin_info["timings_s"]
    assert read_manifest(cfg.run_dir).sort("uid").equals(read_manifest(twin_cfg.run_dir).sort("uid"))
    for key in ("counts", "steps"):
        assert info[key] == twin_info[key]
    assert {k: v for k, v in info["incremental"].items() if k != "parts_linked"} == \
        {k: v for k, v in twin_info["incremental"].items() if k != "parts_linked"}
    assert read_changes(cfg.run_dir)[2].equals(read_changes(twin_cfg.run_dir)[2])
    assert info["delta"] == twin_info["delta"] and info["delta"]["added"] == 40 and info["delta"]["removed"] == 1
    dbp = next(note for note in info["steps"] if note["scorer"] == "dbp")  # quotas from the stored complexity
    assert dbp["complexity_from"].startswith("previous version for ")
    assert read_manifest(version_dir(cfg.run_dir, 1)).height == 300  # earlier versions stay readable


def test_a_changed_store_shard_is_read_again_then_appends_go_by_shard(digits, tmp_path):
    """A store shard's meta touched after its rows file was made (another mtime): the next append run does not trust
    the rows file, reads and verifies every shard (pipeline.append's path), and writes fresh rows files, so the run after
    goes by shard again."""
    root = tmp_path / "data"
    _folder(digits, root, 200)
    steps = [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.002}]
    cfg = _cfg(root, tmp_path / "runs", steps=steps, **{"embed.shard_size": 100, "incremental": {"mode": "append"}})
    run_in_process(cfg)
    store = EmbeddingStore(cfg.store_path)
    meta = store.meta_path(store.shards()[0])
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 1_000_000))
    _folder(digits, root, 20, start=200)
    info = run_in_process(cfg)
    assert "index" in info["timings_s"] and info["incremental"]["new_rows"] == 20
    _folder(digits, root, 20, start=220)
    info = run_in_process(cfg)
    assert "index" not in info["timings_s"] and info["incremental"]["new_rows"] == 20
    assert read_manifest(cfg.run_dir).height == 240 and info["delta"]["added"] == 20
