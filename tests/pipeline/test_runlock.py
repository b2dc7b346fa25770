"""One run per run directory (pipeline/runlock.py), temporary manifest folders of live writers left alone
(pipeline/manifest.py), and a deployment's overrides merged into its config (pipeline/config.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import merge_run_parameters
from pipeline.manifest import _HOST_ID, read_manifest
from pipeline.runlock import LOCK_FILE, RunLockedError, acquire
from tests.reliability._helpers import manifest_frame

REPO = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.runlock import acquire
    lock = acquire(sys.argv[1], flow_run_id="run-A")
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        with pytest.raises(RunLockedError) as refused:
            acquire(run_dir, flow_run_id="run-B")
        message = str(refused.value)
        assert "flow run run-A" in message and f"pid {holder.pid}" in message and str(run_dir) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    # the OS dropped the dead holder's lock; its record says that run did not finish
    with acquire(run_dir, flow_run_id="run-C") as lock:
        assert lock.previous["flow_run_id"] == "run-A" and lock.previous["pid"] == holder.pid
        assert json.loads((run_dir / LOCK_FILE).read_text())["flow_run_id"] == "run-C"
        with pytest.raises(RunLockedError, match="run-C"):  # one holder per directory, in one process too
            acquire(run_dir)
    assert not (run_dir / LOCK_FILE).exists()  # released cleanly: the next run has no previous
    with acquire(run_dir) as lock:
        assert lock.previous is None and lock.holder["flow_run_id"] is None


def test_manifest_writer_removes_only_temporary_folders_of_dead_writers(tmp_path):
    from pipeline.manifest import write_manifest

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    try:
        live_tmp = run_dir / f".manifest.parquet.{_HOST_ID}-{live.pid}-0000aaaa.tmp"
        dead_tmp = run_dir / f".manifest.parquet.{_HOST_ID}-{dead.pid}-0000bbbb.tmp"
        other_host = run_dir / f".manifest.parquet.ffffffff-{dead.pid}-0000cccc.tmp"
        dead_run = run_dir / f".run.json.{_HOST_ID}-{dead.pid}-0000dddd.tmp"
        for folder in (live_tmp, dead_tmp, other_host):
            folder.mkdir()
            (folder / "part-00000.parquet").write_bytes(b"half written")
        dead_run.write_text("{")
        write_manifest(manifest_frame(12), run_dir, {"note": "x"})
        assert live_tmp.is_dir() and other_host.is_dir()  # a live writer's, and one this machine cannot judge
        assert not dead_tmp.exists() and not dead_run.exists()
        assert read_manifest(run_dir).height == 12
    finally:
        live.kill()
        live.wait(30)


def test_overrides_merge_into_the_config_and_are_validated_before_any_work():
    base = {"name": "n", "source": {"kind": "image_folder", "root": "x"}, "index": {"k": 4},
            "steps": [{"scorer": "exact_dup"}, {"scorer": "random", "keep_fraction": 0.5}]}
    cfg = merge_run_parameters(base, keep_fraction=0.3, name="other", overrides={"index.k": 8})
    assert cfg.name == "other" and cfg.index.k == 8 and cfg.steps[1].knobs() == {"keep_fraction": 0.3}
    assert base["steps"][1]["keep_fraction"] == 0.5 and base["index"]["k"] == 4  # the base is not changed
    cfg = merge_run_parameters(base, steps=[{"scorer": "dbp", "keep_fraction": 0.4}])
    assert [s.scorer for s in cfg.steps] == ["dbp"]
    with pytest.raises(ValueError, match="keep_fraction"):
        merge_run_parameters(base, keep_fraction=1.5)
    with pytest.raises(ValueError, match="no step of this config has a keep_fraction"):
        merge_run_parameters({**base, "steps": [{"scorer": "exact_dup"}]}, keep_fraction=0.3)
    with pytest.raises(ValueError, match="plain directory name"):
        merge_run_parameters(base, name="../elsewhere")
