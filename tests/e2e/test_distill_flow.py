"""`winnow distill CONFIG` end to end on real Fashion-MNIST: the real Prefect engine runs the `distill` flow, which
writes PNGs, a valid manifest and run.json with the evaluation against random real subsets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from flows.cli import main
from pipeline.loader import ManifestDataset
from pipeline.manifest import read_manifest, read_run_info


def test_distill_cli_runs_the_flow(shared_data: Path, prefect_server, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    config = {
        "name": "fm-dm-flip",
        "output_root": str(tmp_path / "runs"),
        "data": {"kind": "npz", "name": "fashion_mnist", "root": str(shared_data), "per_class": 20, "test_limit": 200},
        "method": "dm",
        "flip": True,
        "ipc": 1,
        "iterations": 4,
        "batch_real": 16,
        "net": {"width": 8, "depth": 2},
        "n_sets": 2,
        "eval": {"n_nets": 1, "epochs": 5},
        "device": "auto",
        "seed": 3,
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        assert main(["distill", str(path), "--set", "ipc=2"]) == 0
    finally:
        torch.set_num_threads(before)
    run_dir = tmp_path / "runs" / "fm-dm-flip"
    m = read_manifest(run_dir)
    assert m.height == 20 and set(m["reason"]) == {"synthetic"} and set(m["method"]) == {"dm+flip"}
    assert m["uid"][0] == "syn-T_shirt_top-0" and m["uid"][-1] == "syn-Ankle_boot-1"
    info = read_run_info(run_dir)
    assert info["kind"] == "distill" and info["method"] == "dm+flip"
    assert info["device"] == "cpu" or info["device"].startswith("cuda")  # device: auto
    assert info["config"]["distill"]["ipc"] == 2  # the --set override reached the flow
    ev = info["evaluation"]
    assert ev["synthetic"]["n"] == 2 and ev["random_real"]["n"] == 2  # 2 sets × 1 network each
    assert all(0.0 <= a <= 1.0 for a in ev["synthetic"]["accuracies"] + ev["random_real"]["accuracies"])
    assert len(info["loss"]["curve"]) == 4 and set(info["timings_s"]) == {"load", "distill", "evaluate"}
    ds = ManifestDataset(run_dir)
    assert len(ds) == 20
    img, target, weight = ds[len(ds) - 1]
    assert weight == 1.0 and ds.classes[target] == m.sort("uid")["label"][-1]
    on_disk = np.asarray(Image.open(m["location"][0]))
    assert on_disk.shape == (28, 28) and on_disk.dtype == np.uint8
