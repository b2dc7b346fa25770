"""An embedding worker imports nothing on its first item that its forkserver did not preload.

Each embed_refs call (one per shard) starts fresh workers from the forkserver. A module a worker imports lazily is
paid by every worker of every shard: the tensor resize's lazy torchvision import (which pulls in torch._dynamo) cost
5-13 s per worker per shard on the shared 2-core machine, the first item of each shard waiting on it. The test replays
what a forked worker does (import the preload list in order, unpickle the dataset, take item 0) in a fresh
interpreter, and lists what that first item imported.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embed import ClipEmbedder, PixelsEmbedder
from pipeline.embed.loop import DecodePlan, _RefDataset, worker_preload
from pipeline.sources import ImageFolderSource
from scorers.quality import image_stats

REPO = Path(__file__).resolve().parents[2]

REPLAY = r"""
import importlib, json, pickle, sys
for name in json.loads(sys.argv[1]):
    if name != "__main__":
        importlib.import_module(name)
with open(sys.argv[2], "rb") as f:
    dataset = pickle.load(f)
before = set(sys.modules)
item = dataset[0]
print(json.dumps({"status": item.meta["status"], "has_pixels": item.pixels is not None,
                  "new_modules": sorted(set(sys.modules) - before)}))
"""


@pytest.fixture()
def jpeg_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return folder


def _first_item_imports(dataset: _RefDataset, preload: list[str], tmp_path: Path) -> dict:
    blob = tmp_path / "dataset.pkl"
    blob.write_bytes(pickle.dumps(dataset))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", REPLAY, json.dumps(preload), str(blob)], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("decode", ["cpu", "reference"])
def test_clip_worker_first_item_imports_nothing(tiny_clip_model: str, jpeg_folder: Path, tmp_path: Path,
                                                decode: str) -> None:
    emb = ClipEmbedder(tiny_clip_model, None, device="cpu", decode=decode)
    source = ImageFolderSource(jpeg_folder)
    dataset = _RefDataset(source, source.refs(), emb.preprocess, DecodePlan(cover=emb.decode_cover), image_stats)
    result = _first_item_imports(dataset, worker_preload(source, emb.preprocess, image_stats), tmp_path)
    assert result["status"] == "ok" and result["has_pixels"]
    assert result["new_modules"] == []


def test_pixels_worker_first_item_imports_nothing(jpeg_folder: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(jpeg_folder)
    images = [Image.open(p).convert("RGB") for p in sorted(jpeg_folder.iterdir())] * 4
    emb = PixelsEmbedder(size=8, dim=6, fit_samples=12).fit(images)
    dataset = _RefDataset(source, source.refs(), emb.preprocess, DecodePlan(), image_stats)
    result = _first_item_imports(dataset, worker_preload(source, emb.preprocess, image_stats), tmp_path)
    assert result["status"] == "ok" and result["has_pixels"]
    assert result["new_modules"] == []


def test_cpu_encoder_leaves_the_workers_their_cores_only_while_it_waits() -> None:
    from pipeline.embed.loop import CpuThreadShare, available_cpus

    before = torch.get_num_threads()
    torch.set_num_threads(available_cpus() + 2)  # more threads than the workers leave, whatever the machine
    try:
        full = torch.get_num_threads()
        share = CpuThreadShare(torch.device("cpu"), num_workers=available_cpus())
        assert share.active and share.shared == 1
        share.after_batch(waited=0.5, encoded=0.01)  # the encoder waited: the loader is the slower side
        assert torch.get_num_threads() == 1
        share.after_batch(waited=0.5, encoded=0.01)
        assert torch.get_num_threads() == 1
        share.after_batch(waited=0.0001, encoded=0.5)  # a batch was ready: the encoder is the slower side
        assert torch.get_num_threads() == full
        share.after_batch(waited=0.5, encoded=0.01)
        share.restore()
        assert torch.get_num_threads() == full
        # no workers, or another device: the encoder's threads are never touched
        for device, workers in ((torch.device("cpu"), 0), (torch.device("cuda"), available_cpus())):
            other = CpuThreadShare(device, num_workers=workers)
            other.after_batch(waited=0.5, encoded=0.01)
            assert not other.active and torch.get_num_threads() == full
    finally:
        torch.set_num_threads(before)


def test_embed_refs_gives_the_encoder_its_threads_back(tiny_clip_model: str, jpeg_folder: Path) -> None:
    from pipeline.embed import embed_refs

    emb = ClipEmbedder(tiny_clip_model, None, device="cpu")
    source = ImageFolderSource(jpeg_folder)
    before = torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        shard = embed_refs(source, list(source.refs()) * 20, emb, batch_size=2, num_workers=2)
        assert shard.n_ok == 60
        assert torch.get_num_threads() == 5
        assert 0 <= shard.timings["batches_on_shared_threads"] <= 29  # never the first batch (the workers' start)
    finally:
        torch.set_num_threads(before)
