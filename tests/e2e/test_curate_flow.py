"""The curate flow end to end through a real Prefect engine, real open_clip models, real images and files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.curate import run_curate
from pipeline.manifest import read_manifest, read_run_info
from pipeline.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[2]


def _clip_config(tmp_path: Path, root: Path, model: str, **embed) -> dict:
    return {
        "name": "e2e",
        "source": {"kind": "image_folder", "root": str(root)},
        "embed": {"kind": "clip", "model": model, "pretrained": None, "batch_size": 32, "num_workers": 2, "shard_size": 200, **embed},
        "index": {"k": 10},
        "steps": [{"scorer": "exact_dup"}, {"scorer": "random", "keep_fraction": 0.5}],
        "output_root": str(tmp_path / "runs"),
    }


def test_cifar_subset_with_tiny_clip(prefect_server, cifar_subset, tiny_clip_checkpoint, tiny_clip_model, tmp_path):
    config = _clip_config(tmp_path, cifar_subset / "train", tiny_clip_model, checkpoint=str(tiny_clip_checkpoint))
    info = run_curate(config)
    frame = read_manifest(tmp_path / "runs" / "e2e")
    files = sorted(p.relative_to(cifar_subset / "train").as_posix() for p in (cifar_subset / "train").rglob("*.jpg"))
    assert frame.height == len(files) == 500
    assert frame["uid"].to_list() == files  # uids are relative paths, never row numbers
    assert frame["label"].to_list() == [f.split("/")[0] for f in files]
    assert frame.schema["weight"] == pl.Float32 and frame.schema["cluster"] == pl.Int32
    kept = frame.filter(pl.col("keep"))
    assert kept.height == 250 and kept["weight"].to_list() == [1.0] * 250
    assert kept.group_by("label").len()["len"].to_list() == [25] * 10  # class-balanced random
    assert frame["cluster"].n_unique() <= 10 and frame["cluster"].min() >= 0
    assert info["counts"]["samples"] == 500 and info["counts"]["kept"] == 250
    store = EmbeddingStore(tmp_path / "runs" / "e2e" / "store")
    assert store.info().embedder["weights_sha256"]
    emb, _ = store.load()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)  # float16 storage
    # a second run reuses every shard and gives the same manifest
    info2 = run_curate(config)
    assert info2["counts"]["embed_shards_skipped"] == 3
    assert read_manifest(tmp_path / "runs" / "e2e").equals(frame)


def test_precomputed_embeddings_enter_the_store(prefect_server, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    uids = []
    for shard in range(2):
        x = rng.normal(size=(60, 16)).astype(np.float32)
        np.save(tmp_path / "img_emb" / f"img_emb_{shard}.npy", x)
        keys = [f"{shard:03d}{i:05d}" for i in range(60)]
        uids += keys
        pl.DataFrame({"key": keys, "caption": ["c"] * 60}).write_parquet(tmp_path / "metadata" / f"metadata_{shard}.parquet")
    config = {
        "name": "pre",
        "source": {
            "kind": "precomputed",
            "emb_paths": str(tmp_path / "img_emb" / "*.npy"),
            "meta_paths": str(tmp_path / "metadata" / "*.parquet"),
        },
        "embed": {"kind": "precomputed", "dtype": "float32"},
        "index": {"k": 4},
        "steps": [{"scorer": "random", "keep_fraction": 0.25}],
        "output_root": str(tmp_path / "runs"),
    }
    run_curate(config)
    frame = read_manifest(tmp_path / "runs" / "pre")
    assert sorted(frame["uid"].to_list()) == sorted(uids)
    assert frame["keep"].sum() == 30
    emb, meta = EmbeddingStore(tmp_path / "runs" / "pre" / "store").load()
    first = np.load(tmp_path / "img_emb" / "img_emb_0.npy")
    np.testing.assert_allclose(emb[:60], first / np.linalg.norm(first, axis=1, keepdims=True), rtol=1e-6)


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_during_embedding_then_rerun(cifar_subset, tiny_clip_checkpoint, tiny_clip_model, tmp_path):
    """A real `winnow run` killed with SIGKILL mid-embedding; the rerun redoes only unfinished shards."""
    import json

    import yaml

    cfg_json = tmp_path / f"{tiny_clip_model}.json"
    from tests.conftest import TINY_CLIP_CONFIG

    cfg_json.write_text(json.dumps(TINY_CLIP_CONFIG))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    config = _clip_config(
        tmp_path, cifar_subset, tiny_clip_model, checkpoint=str(tiny_clip_checkpoint), model_config_file=str(cfg_json), shard_size=50, num_workers=1
    )
    config_path = tmp_path / "kill.yaml"
    config_path.write_text(yaml.safe_dump(config))
    store = EmbeddingStore(tmp_path / "runs" / "e2e" / "store")

    proc = _cli(["run", str(config_path)], env)
    deadline = time.time() + 240
    while not store.done_shards() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:  # it ended before any shard was done: say why instead of killing nothing
        pytest.fail(f"winnow run exited ({proc.returncode}) before the kill:\n{proc.stdout.read().decode()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = store.done_shards()
    n_shards = store.info().n_shards
    assert 1 <= len(done_before) < n_shards, f"kill landed after {len(done_before)} of {n_shards} shards"
    stamps = {s: (store.done_path(s).stat().st_mtime_ns, store.emb_path(s).stat().st_mtime_ns) for s in done_before}

    rerun = _cli(["run", str(config_path)], env)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out.decode()[-3000:]
    assert {s: (store.done_path(s).stat().st_mtime_ns, store.emb_path(s).stat().st_mtime_ns) for s in done_before} == stamps
    info = read_run_info(tmp_path / "runs" / "e2e")
    assert info["counts"]["embed_shards_skipped"] == len(done_before)
    resumed = read_manifest(tmp_path / "runs" / "e2e")

    # the same config, uninterrupted, in a fresh directory
    clean = dict(config, output_root=str(tmp_path / "clean"))
    clean_path = tmp_path / "clean.yaml"
    clean_path.write_text(yaml.safe_dump(clean))
    run = _cli(["run", str(clean_path)], env)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out.decode()[-3000:]
    assert read_manifest(tmp_path / "clean" / "e2e").equals(resumed)
    e1, _ = store.load()
    e2, _ = EmbeddingStore(tmp_path / "clean" / "e2e" / "store").load()
    assert np.array_equal(e1, e2)
