"""The same curate run on Prefect's local thread pool, on a Dask LocalCluster of 2 worker processes and on a
local Ray cluster gives the same manifest: embedding shards, assignment shards and SemDeDup cluster batches
run as tasks in the workers, which rebuild the open_clip model from the config and a checkpoint file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flows.curate import run_curate
from pipeline.manifest import read_manifest
from tests.conftest import TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny open_clip architecture file and a seeded checkpoint: everything a worker process needs."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("runner_clip")
    config_file = folder / "winnow-runner-tiny.json"
    config_file.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    torch.save(open_clip.create_model("winnow-runner-tiny", pretrained=None).state_dict(), checkpoint)
    return {"model_config_file": str(config_file), "checkpoint": str(checkpoint)}


def _config(out: Path, root: Path, clip_files: dict[str, str], runner: dict) -> dict:
    return {
        "name": "runners",
        "source": {"kind": "image_folder", "root": str(root)},
        "embed": {"kind": "clip", "model": "winnow-runner-tiny", "pretrained": None, "batch_size": 50, "num_workers": 0,
                  "shard_size": 100, **clip_files},
        "index": {"k": 12},
        "runner": runner,
        "steps": [
            {"scorer": "exact_dup"},
            {"scorer": "semdedup", "target_keep_of_entering": 0.8, "eps_grid": [0.001, 0.01, 0.1]},
            {"scorer": "dbp", "keep_fraction": 0.5},
            {"scorer": "prototype"},
        ],
        "output_root": str(out),
    }


@pytest.fixture(scope="module")
def local_manifest(prefect_server, cifar_subset: Path, clip_files, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("local")
    config = _config(out, cifar_subset / "train", clip_files, {"kind": "local", "workers": 2})
    info = run_curate({**config, "export_uri": f"file://{out}/bucket"})  # and a copy on an fsspec filesystem
    semdedup_note = next(n for n in info["steps"] if n["scorer"] == "semdedup")
    frame = read_manifest(out / "runners")
    assert info["exported_to"] == f"file://{out}/bucket/runners"
    assert read_manifest(out / "bucket" / "runners").equals(frame)
    return frame, semdedup_note


def _check_same(local_manifest, out: Path, info: dict) -> None:
    expected, expected_note = local_manifest
    frame = read_manifest(out / "runners")
    assert frame.height == 500 and frame.columns == expected.columns
    assert frame.equals(expected)  # every row, score, cluster and reason
    note = next(n for n in info["steps"] if n["scorer"] == "semdedup")
    assert note["kept_by_eps"] == expected_note["kept_by_eps"]
    assert 0 < frame["keep"].sum() < 500
    assert (out / "runners" / "store" / "index").is_dir()


@pytest.mark.skipif(importlib.util.find_spec("prefect_dask") is None, reason="prefect-dask is not installed (extra: dask)")
def test_dask_local_cluster_gives_the_local_manifest(local_manifest, cifar_subset, clip_files, tmp_path) -> None:
    info = run_curate(_config(tmp_path, cifar_subset / "train", clip_files, {"kind": "dask", "workers": 2, "cluster_batches": 4}))
    _check_same(local_manifest, tmp_path, info)


@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None, reason="prefect-ray is not installed (extra: ray)")
def test_ray_local_cluster_gives_the_local_manifest(local_manifest, cifar_subset, clip_files, tmp_path) -> None:
    info = run_curate(_config(tmp_path, cifar_subset / "train", clip_files, {"kind": "ray", "workers": 2, "cluster_batches": 4}))
    _check_same(local_manifest, tmp_path, info)
