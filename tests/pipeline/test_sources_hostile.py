"""Hostile and odd files in sources (#18): FIFOs, devices, huge files, symlinks out of the root, unlistable folders.

The FIFO and /dev/zero cases run in a subprocess with a timeout, so a regression fails the test instead of hanging it
or filling the memory; the subprocess reports its own peak RSS.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.sources import (
    DEFAULT_MAX_FILE_BYTES,
    FileTooLargeError,
    ImageFolderSource,
    NotRegularFileError,
    OutsideRootError,
    PrecomputedSource,
    SourceError,
    TableSource,
    WebDatasetSource,
    source_from_config,
)

REPO = Path(__file__).resolve().parents[2]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), seed % 256, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """root/{a,b}/ with real PNGs, a FIFO named .png, a link to /dev/zero and a 1 GiB sparse file behind a link."""
    root = tmp_path / "root"
    for i, cls in enumerate(("a", "a", "b", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i}.png").write_bytes(_png(i))
    os.mkfifo(root / "a" / "fifo.png")
    os.symlink("/dev/zero", root / "b" / "zero.png")
    huge = tmp_path / "outside" / "huge.png"
    huge.parent.mkdir()
    with open(huge, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: 1 GiB of zeros that takes no disk
    os.symlink(huge, root / "b" / "huge.png")
    return root


def _run_child(code: str, timeout: float = 60) -> dict:
    """Runs `code` in a fresh interpreter (killed after `timeout` s); it prints one JSON line, returned parsed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CHILD_READ_ALL = """
import json, sys
from pipeline.sources import ImageFolderSource, RefusedFileError
src = ImageFolderSource(sys.argv[1] if len(sys.argv) > 1 else {root!r}, follow_symlinks=True)
out = {{}}
for ref in src.refs():
    try:
        out[ref.uid] = len(src.read_bytes(ref))
    except RefusedFileError as exc:
        out[ref.uid] = exc.status
# VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across exec
out["_peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps(out))
"""


def test_fifo_device_link_and_huge_file_are_refused_without_hanging_or_memory(hostile_folder: Path) -> None:
    # A FIFO with no writer blocks a plain open() forever; /dev/zero grows memory without end; the 1 GiB file is
    # over the default cap. In a child with a timeout: a regression fails here instead of hanging the suite.
    result = _run_child(CHILD_READ_ALL.format(root=str(hostile_folder)))
    peak = result.pop("_peak_rss_mb")
    assert result == {
        "a/0.png": len(_png(0)), "a/1.png": len(_png(1)), "b/2.png": len(_png(2)), "b/3.png": len(_png(3)),
        "a/fifo.png": "not_regular_file", "b/zero.png": "not_regular_file", "b/huge.png": "too_large",
    }
    assert peak < 200, f"reading the hostile folder peaked at {peak:.0f} MB"  # nothing large is ever read


def test_max_file_bytes_caps_reads_of_every_image_source(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "small.png").write_bytes(_png(1))
    (root / "big.png").write_bytes(_png(2) + b"\0" * 4000)
    src = ImageFolderSource(root, max_file_bytes=1000)
    by_uid = {r.uid: r for r in src.refs()}
    assert src.read_bytes(by_uid["small.png"]) == _png(1)
    with pytest.raises(FileTooLargeError, match="max_file_bytes") as err:
        src.read_bytes(by_uid["big.png"])
    assert err.value.status == "too_large"
    # the knob travels through describe() / the config, as a worker or the loader rebuilds the source
    assert source_from_config(json.loads(json.dumps(src.describe()))).max_file_bytes == 1000
    assert ImageFolderSource(root).max_file_bytes == DEFAULT_MAX_FILE_BYTES
    for bad in (0, -1, 1.5, "1000", True):
        with pytest.raises(SourceError, match="max_file_bytes"):
            ImageFolderSource(root, max_file_bytes=bad)

    pq.write_table(pa.table({"path": ["imgs/small.png", "imgs/big.png", f"file://{root}/big.png"]}), tmp_path / "t.parquet")
    table = TableSource(tmp_path / "t.parquet", max_file_bytes=1000)
    refs = table.refs()
    assert table.read_bytes(refs[0]) == _png(1)
    for ref in refs[1:]:  # a file:// URL gets the same checks as a path
        with pytest.raises(FileTooLargeError):
            table.read_bytes(ref)

    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in (("k1.png", _png(1)), ("k2.png", _png(2) + b"\0" * 4000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    wds = WebDatasetSource(str(tar), max_file_bytes=1000)
    r1, r2 = wds.refs()
    assert wds.read_bytes(r1) == _png(1)
    with pytest.raises(FileTooLargeError):
        wds.read_bytes(r2)


def test_tar_link_members_are_listed_and_refused_never_followed(tmp_path: Path) -> None:
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("k1.png")
        info.size = len(_png(1))
        t.addfile(info, io.BytesIO(_png(1)))
        link = tarfile.TarInfo("k2.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        fifo = tarfile.TarInfo("k3.png")
        fifo.type = tarfile.FIFOTYPE
        t.addfile(fifo)
    src = WebDatasetSource(str(tar))
    refs = src.refs()
    assert [r.uid for r in refs] == ["k1", "k2", "k3"]  # every sample keeps a row
    assert src.read_bytes(refs[0]) == _png(1)
    for ref in refs[1:]:
        with pytest.raises(NotRegularFileError):
            src.read_bytes(ref)


def test_special_files_given_as_shards_or_tables_are_source_errors(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "shard.tar")
    with pytest.raises(SourceError, match="FIFO"):
        WebDatasetSource(str(tmp_path / "shard.tar")).refs()
    os.mkfifo(tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="not a regular file"):
        TableSource(tmp_path / "t.parquet")
    os.mkfifo(tmp_path / "emb_0.npy")
    (tmp_path / "meta_0.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match="not regular files"):
        PrecomputedSource(str(tmp_path / "emb_*.npy"), str(tmp_path / "meta_*.parquet"))


# ---- one symlink policy ------------------------------------------------------------------------------------------
@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "c").mkdir(parents=True)
    outside.mkdir()
    (root / "c" / "in.png").write_bytes(_png(1))
    (outside / "secret.png").write_bytes(_png(2))
    os.symlink(root / "c" / "in.png", root / "c" / "inner_link.png")  # stays inside: always fine
    os.symlink(outside / "secret.png", root / "c" / "out_link.png")
    return root, outside


def test_image_folder_refuses_links_out_of_the_root_by_default(linked: tuple[Path, Path]) -> None:
    root, outside = linked
    with pytest.raises(SourceError, match="out_link.png") as err:
        ImageFolderSource(root).refs()
    assert "follow_symlinks: true" in str(err.value) and str(outside / "secret.png") in str(err.value)
    os.unlink(root / "c" / "out_link.png")
    src = ImageFolderSource(root)
    refs = src.refs()
    assert [r.uid for r in refs] == ["c/in.png", "c/inner_link.png"]
    assert src.read_bytes(refs[1]) == _png(1)
    # swapped for a link out of the root after listing: the read refuses it with a status
    os.unlink(root / "c" / "inner_link.png")
    os.symlink(outside / "secret.png", root / "c" / "inner_link.png")
    with pytest.raises(OutsideRootError) as err2:
        src.read_bytes(refs[1])
    assert err2.value.status == "outside_root"


def test_follow_symlinks_allows_links_out_of_the_root(linked: tuple[Path, Path]) -> None:
    root, _ = linked
    src = ImageFolderSource(root, follow_symlinks=True)
    by_uid = {r.uid: r for r in src.refs()}
    assert set(by_uid) == {"c/in.png", "c/inner_link.png", "c/out_link.png"}
    assert src.read_bytes(by_uid["c/out_link.png"]) == _png(2)
    assert source_from_config(src.describe()).follow_symlinks is True


def test_table_with_root_has_the_same_policy(linked: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = linked
    pq.write_table(pa.table({"path": ["c/in.png", "c/out_link.png"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="escapes root.*follow_symlinks: true"):
        TableSource(tmp_path / "t.parquet", root=root).refs()
    src = TableSource(tmp_path / "t.parquet", root=root, follow_symlinks=True)
    assert src.read_bytes(src.refs()[1]) == _png(2)
    # follow_symlinks allows links, never `..` out of the root
    pq.write_table(pa.table({"path": ["../outside/secret.png"]}), tmp_path / "u.parquet")
    with pytest.raises(SourceError, match="escapes root"):
        TableSource(tmp_path / "u.parquet", root=root, follow_symlinks=True).refs()


def test_folder_symlinks_are_not_followed_and_are_reported(linked: tuple[Path, Path]) -> None:
    root, outside = linked
    os.unlink(root / "c" / "out_link.png")
    os.symlink(outside, root / "linked_dir")
    src = ImageFolderSource(root)
    assert [r.uid for r in src.refs()] == ["c/in.png", "c/inner_link.png"]
    assert src.unlisted_folders() == [{"path": str(root / "linked_dir"), "why": "folder symlink, not followed"}]


# ---- unlistable folders ------------------------------------------------------------------------------------------
def _folder_with_blocked(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    for cls in ("ok", "blocked"):
        (root / cls / "deeper").mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.png").write_bytes(_png(i))
        (root / cls / "deeper" / "x.png").write_bytes(_png(9))
    return root, root / "blocked"


def test_unlistable_folder_is_reported_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated (works as root too): scandir of one folder fails the way a permission-denied folder does.
    root, blocked = _folder_with_blocked(tmp_path)
    real_scandir = os.scandir

    def scandir(path: str = "."):
        if os.fspath(path) == str(blocked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = ImageFolderSource(root)
    assert [r.uid for r in src.refs()] == ["ok/0.png", "ok/1.png", "ok/deeper/x.png"]
    assert src.unlisted_folders() == [{"path": str(blocked), "why": "Permission denied"}]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode: see the simulated test above")
def test_unlistable_folder_is_reported_real_permissions(tmp_path: Path) -> None:
    root, blocked = _folder_with_blocked(tmp_path)
    blocked.chmod(0)
    try:
        src = ImageFolderSource(root)
        assert [r.uid for r in src.refs()] == ["ok/0.png", "ok/1.png", "ok/deeper/x.png"]
        assert src.unlisted_folders() == [{"path": str(blocked), "why": "Permission denied"}]
    finally:
        blocked.chmod(0o755)


def test_resolved_equals_realpath_for_files_folders_and_links(tmp_path: Path) -> None:
    from pipeline.sources import _real_path

    folders: dict[str, str] = {}

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"a")
    (root / "link.jpg").symlink_to(outside / "secret.jpg")  # a file link out of the root
    (root / "linked_dir").symlink_to(outside)  # a folder link out of the root
    (root / "sub" / "inner.jpg").symlink_to(root / "sub" / "a.jpg")
    for p in (root / "sub" / "a.jpg", root / "link.jpg", root / "linked_dir" / "secret.jpg", root / "sub" / "inner.jpg",
              root / "sub" / ".." / "sub" / "a.jpg"):
        is_link = os.path.islink(p)
        assert _real_path(str(p), None, is_link) == _real_path(str(p), folders, is_link) == os.path.realpath(p)
