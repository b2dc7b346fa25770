"""A full disk mid-write leaves the previous results byte-identical and no temp file that looks valid.

Mounting a small tmpfs needs root, so each write runs in a child process under RLIMIT_FSIZE: a write() past the
limit fails with EFBIG (SIGXFSZ ignored), which takes the same path through the writers as ENOSPC on a full disk
(an OSError from write() or close() in the middle of a file). The writers are the real ones: write_manifest,
EmbeddingStore.write_shard and write_report. The parent checks every file under the output afterwards.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import read_manifest, read_run_info
from pipeline.store import EmbeddingStore

from ._helpers import make_store, snapshot, write_run

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import errno, json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import numpy as np
from tests.reliability._helpers import manifest_frame, meta_rows, unit
from pipeline.manifest import write_manifest
from pipeline.store import EmbeddingStore
from pipeline.report import write_report
target = Path({target!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of being killed
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, hard))
try:
{body}
except OSError as exc:
    print(json.dumps({{"error": "OSError", "errno": exc.errno, "message": str(exc)[:300]}}))
    sys.exit(0)
except BaseException as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)[:300]}}))
    sys.exit(3)
print(json.dumps({{"error": None}}))
sys.exit(4)
"""


def run_out_of_space(target: Path, limit: int, body: str) -> dict:
    """Runs `body` (indented Python using `target`) in a child whose files cannot grow past `limit` bytes."""
    code = CHILD.format(repo=str(REPO), target=str(target), limit=limit, body=textwrap.indent(textwrap.dedent(body), "    "))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin", "HOME": str(target.parent)})
    assert proc.returncode == 0, f"the write did not fail with an OSError: {proc.stdout} {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errno"] == 27, out  # EFBIG: the limit was hit, not some other failure
    return out


def assert_unchanged(root: Path, before: dict[str, bytes]) -> None:
    after = snapshot(root)
    assert sorted(after) == sorted(before), f"files appeared or vanished: {set(after) ^ set(before)}"
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], f"changed by a failed write: {changed}"


def test_manifest_rewrite_on_a_full_disk_keeps_the_previous_run(tmp_path):
    run = tmp_path / "run"
    write_run(run, n=30, note="first")
    before = snapshot(run)
    # the new manifest (20,000 rows) cannot fit under 16 KB
    run_out_of_space(run, 16_000, "write_manifest(manifest_frame(20_000), target, {'note': 'second'})")
    assert_unchanged(run, before)
    assert read_manifest(run).height == 30 and read_run_info(run)["note"] == "first"


def test_run_json_that_cannot_be_written_keeps_the_previous_run(tmp_path):
    """The manifest fits but run.json does not: the old code had already replaced the manifest and deleted run.json."""
    run = tmp_path / "run"
    write_run(run, n=30, note="first")
    before = snapshot(run)
    run_out_of_space(run, 16_000, "write_manifest(manifest_frame(40), target, {'note': 'x' * 50_000})")
    assert_unchanged(run, before)
    assert read_manifest(run).height == 30 and read_run_info(run)["note"] == "first"


def test_new_shard_on_a_full_disk_is_not_done_and_earlier_shards_are_intact(tmp_path):
    root = tmp_path / "s"
    store = make_store(root, n_shards=3, rows=6, dim=8)
    store.done_path(2).unlink()
    store.emb_path(2).unlink()
    store.meta_path(2).unlink()
    before = snapshot(root)
    run_out_of_space(root, 4_000, """
        store = EmbeddingStore(target)
        rows = 6
        uids = [f"s2/{i:03d}" for i in range(rows)]
        store.write_shard(2, unit(np.random.default_rng(9), rows, 8), meta_rows(uids, ["ok"] * rows, caption_len=2000))
    """)
    assert_unchanged(root, before)
    assert store.done_shards() == [0, 1]


def test_rewriting_a_done_shard_on_a_full_disk_keeps_the_old_shard_done_and_whole(tmp_path):
    """The embeddings fit, the metadata does not: the old code had already replaced the .npy under the old marker,
    so a store that looked complete held new embeddings beside old metadata."""
    root = tmp_path / "s"
    store = make_store(root, n_shards=2, rows=6, dim=8)
    emb, meta = store.load()
    before = snapshot(root)
    run_out_of_space(root, 4_000, """
        store = EmbeddingStore(target)
        rows = 6
        uids = [f"s0/{i:03d}" for i in range(rows)]
        store.write_shard(0, unit(np.random.default_rng(7), rows - 1, 8), meta_rows(uids, ["ok"] * (rows - 1) + ["corrupt"], caption_len=2000))
    """)
    assert_unchanged(root, before)
    emb2, meta2 = EmbeddingStore(root).load()
    assert np.array_equal(emb, emb2) and meta.equals(meta2)


def test_report_on_a_full_disk_keeps_the_previous_report(tmp_path):
    from pipeline.report import write_report

    run = tmp_path / "run"
    write_run(run, n=30)
    write_report(run)
    before = snapshot(run)
    assert "report.html" in before
    run_out_of_space(run, 2_000, "write_report(target)")
    assert_unchanged(run, before)


def test_the_limit_really_is_enforced_for_the_writers(tmp_path):
    """The same child and writer with room to spare succeeds: the failures above come from the size limit."""
    code = CHILD.format(repo=str(REPO), target=str(tmp_path / "run"), limit=50_000_000,
                        body="    write_manifest(manifest_frame(20_000), target, {'note': 'second'})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert read_manifest(tmp_path / "run").height == 20_000


def test_dev_full_gives_enospc_through_the_same_write_path():
    """ENOSPC itself, where the machine has /dev/full: the writers' temp-file writes fail the same way (an OSError)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(OSError) as err:
        with open("/dev/full", "wb") as fh:
            np.save(fh, np.zeros((1000, 8), np.float32))
    assert err.value.errno == 28
    with pytest.raises(OSError):
        pq.write_table(pa.table({"x": list(range(10_000))}), "/dev/full")
