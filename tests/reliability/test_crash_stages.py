"""SIGKILL at every stage kind of a real `winnow run`, then a rerun: the manifest is identical to an uninterrupted
run's, and the work finished before the kill (store shards, per-shard k-means assignments) is reused, not redone.

The kill comes from a failpoint (pipeline/faults.py): WINNOW_FAILPOINT=<name>:<n> makes the process SIGKILL itself
the n-th time it passes that point, so each test kills inside the stage it names, every time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows.demo import write_digits
from pipeline.manifest import ManifestError, read_manifest, read_run_info
from pipeline.store import EmbeddingStore
from tests.reliability._helpers import kill_tagged, tagged_processes

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _config(root: Path, out: Path) -> dict:
    return {
        "name": "crash",
        "source": {"kind": "image_folder", "root": str(root)},
        "embed": {"kind": "pixels", "shard_size": 300, "num_workers": 0, "pixels": {"size": 8, "grey": True, "dim": 16}},
        "index": {"k": 10},
        "steps": [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.02}, {"scorer": "dbp", "keep_fraction": 0.5}],
        "output_root": str(out),
        "report": False,
    }


def _winnow_run(config: dict, tmp: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """`winnow run` in its own process group, output to files.

    A SIGKILLed run leaves its Prefect server child orphaned, holding any pipe it inherited open; so no pipes,
    and the group is killed once the run has ended.
    """
    path = tmp / f"{Path(config['output_root']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    tag = uuid.uuid4().hex  # every process the run starts inherits it: the cleanup below finds them all
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect_home"), "WINNOW_TEST_TAG": tag}
    env.pop("WINNOW_FAILPOINT", None)
    if failpoint:
        env["WINNOW_FAILPOINT"] = failpoint
    log = tmp / f"winnow-run-{failpoint or 'plain'}.log".replace(":", "-")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # winnow's watchdog ends what a killed run left (pipeline/reaper.py); whatever is still there after a
            # grace period (the Prefect server is in a session of its own, out of reach of killpg) is killed here
            deadline = time.monotonic() + 20
            while tagged_processes(tag) and time.monotonic() < deadline:
                time.sleep(0.2)
            kill_tagged(tag)
    return subprocess.CompletedProcess(proc.args, code, stdout=log.read_text()[-3000:], stderr="")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    write_digits(folder)  # 1,797 real scans: 6 shards of 300
    return folder


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    done = _winnow_run(_config(digits, tmp / "runs"), tmp)
    assert done.returncode == 0, done.stdout
    return read_manifest(tmp / "runs" / "crash")


def _stamps(files: list[Path]) -> dict[str, int]:
    return {f.name + f.parent.name: f.stat().st_mtime_ns for f in files}


@pytest.mark.parametrize(
    "failpoint",
    [
        "embed_shard:3",  # fan-out: killed after the 3rd of 6 store shards was committed
        "assign_shard:4",  # fan-out: killed after the 4th of 6 k-means assignment shards was saved
        "score_step:2",  # fan-in: killed between SemDeDup and DBP
        "manifest_commit",  # the commit: parts and run.json staged, old run.json removed, nothing renamed yet
    ],
)
def test_sigkill_then_rerun_gives_the_uninterrupted_manifest(failpoint, digits, uninterrupted, tmp_path) -> None:
    config = _config(digits, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "crash"
    store = EmbeddingStore(run_dir / "store")

    killed = _winnow_run(config, tmp_path, failpoint)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stdout)
    with pytest.raises(ManifestError, match="did not finish"):  # no run.json: nothing claims to be finished
        read_run_info(run_dir)
    shards = [store.emb_path(s) for s in store.done_shards()]
    assignments = sorted((store.root / "index").glob("assign-*/*.npz"))
    if failpoint.startswith("embed_shard"):
        assert len(shards) == 3 and not assignments
    elif failpoint.startswith("assign_shard"):
        assert len(shards) == 6 and len(assignments) == 4
    else:
        assert len(shards) == 6 and len(assignments) == 6
    before = _stamps(shards + assignments)

    rerun = _winnow_run(config, tmp_path)
    assert rerun.returncode == 0, rerun.stdout
    assert _stamps(shards + assignments) == before  # finished work is reused, byte for byte untouched
    info = read_run_info(run_dir)
    assert info["counts"]["embed_shards_skipped"] == len(shards)
    assert read_manifest(run_dir).equals(uninterrupted)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no staging left behind
