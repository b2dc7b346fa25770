"""A whole curate run over a folder with hostile entries (#18): a FIFO named .png, a symlink to /dev/zero, a folder
that cannot be listed. The run finishes, records each with a status or a warning, and run.json on disk holds the
manifest stage's time."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from pipeline.manifest import read_manifest, read_run_info

REPO = Path(__file__).resolve().parents[2]


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
            (root / cls / f"{i}.png").write_bytes(buf.getvalue())
    os.mkfifo(root / "a" / "fifo.png")
    os.symlink("/dev/zero", root / "b" / "zero.png")
    return root / "c"  # the folder made unlistable


def _config(root: Path, out: Path, name: str) -> dict:
    return {
        "name": name,
        # follow_symlinks: the /dev/zero link resolves outside the root and would be refused at listing otherwise
        "source": {"kind": "image_folder", "root": str(root), "follow_symlinks": True},
        "embed": {"kind": "pixels", "shard_size": 8, "num_workers": 0, "pixels": {"size": 8, "dim": 8}},
        "index": {"k": 2},
        "steps": [{"scorer": "exact_dup"}],
        "output_root": str(out),
        "report": False,
    }


CHILD = """
import json, os, sys
from pipeline.config import CurateConfig
from pipeline.stages import run_in_process

blocked = sys.argv[2]
real_scandir = os.scandir
def scandir(path="."):  # a folder that cannot be listed, as permission denied does (works as root too)
    if os.fspath(path) == blocked:
        raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_scandir(path)
os.scandir = scandir
run_in_process(CurateConfig.model_validate(json.loads(sys.argv[1])))
print("done")
"""


def _check_run(run_dir: Path, blocked: Path) -> None:
    info = read_run_info(run_dir)  # as written on disk
    assert info["counts"]["unlisted_folders"] == {"count": 1, "folders": [{"path": str(blocked), "why": "Permission denied"}]}
    assert info["counts"]["store_status"] == {"not_regular_file": 2, "ok": 16}
    assert info["timings_s"]["manifest"] > 0 and len(info["stage_spans"]["manifest"]) == 2
    m = read_manifest(run_dir)
    status = dict(zip(m["uid"].to_list(), m["status"].to_list()))
    assert status["a/fifo.png"] == status["b/zero.png"] == "not_regular_file"
    assert m.height == 18 and not any(uid.startswith("c/") for uid in status)


def test_fifo_dev_zero_and_unlistable_folder_in_a_whole_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocked = _folder(tmp_path / "imgs")
    config = _config(tmp_path / "imgs", tmp_path / "runs", "hostile")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # a child with a timeout: a FIFO that blocks a read fails this test instead of hanging it
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), str(blocked)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "hostile"
    _check_run(run_dir, blocked)
    assert main(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"warning: 1 folder(s) of the source could not be listed" in out and str(blocked) in out


def test_the_flow_records_unlisted_folders_and_the_manifest_time(prefect_server, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.curate import run_curate

    blocked = _folder(tmp_path / "imgs")
    real_scandir = os.scandir

    def scandir(path: str = "."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    info = run_curate(_config(tmp_path / "imgs", tmp_path / "runs", "hostile_flow"))
    assert info["counts"]["unlisted_folders"]["count"] == 1
    _check_run(tmp_path / "runs" / "hostile_flow", blocked)
