"""The columnar source listing (#15): image folders, tars and tables list as columns, not one Python object per sample;
SampleRefs are built only for the rows asked for. Real files throughout."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.changes import listing_frame
from pipeline.sources import ImageFolderSource, Listing, SampleRef, SourceError, TableSource, WebDatasetSource
from tests.pipeline.test_sources import _write_tar

REPO = Path(__file__).resolve().parents[2]


def _folder(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def test_image_folder_listing_is_columns_in_the_old_order(tmp_path: Path) -> None:
    names = ["b/z.png", "a/é.jpg", "a/b.jpg", "a/B.jpg", "b/sub/x.png", "a/10.png", "a/9.png", "b/ä/y.png"]
    src = ImageFolderSource(_folder(tmp_path / "root", names))
    refs = src.refs()
    assert isinstance(refs, Listing) and len(refs) == len(names)
    assert [r.uid for r in refs] == sorted(names)  # the order of sorted() on the uid strings (code points)
    assert refs.frame.columns == ["uid", "label", "size", "token"]  # no location column: root + uid
    root = str(tmp_path / "root")
    expected = [SampleRef(uid=n, location=os.path.join(root, *n.split("/")), label=n.split("/")[0]) for n in sorted(names)]
    assert list(refs) == expected and refs == expected
    assert refs[-1] == expected[-1] and refs[2:4] == expected[2:4]
    with pytest.raises(IndexError):
        refs[len(names)]
    shard = refs.take(np.array([5, 1]))
    assert list(shard) == [expected[5], expected[1]]
    assert list(pickle.loads(pickle.dumps(shard))) == [expected[5], expected[1]]  # what a worker process receives
    size, token = refs.stats()
    for ref, n, t in zip(refs, size, token):
        st = os.stat(ref.location)
        assert (n, t) == (st.st_size, st.st_mtime_ns)
    frame = listing_frame(refs, src)  # change detection takes these columns as they are
    assert frame["uid"].to_list() == sorted(names) and frame["size"].to_list() == size.tolist()


def test_split_labels_and_loose_files(tmp_path: Path) -> None:
    root = _folder(tmp_path / "root", ["train/cat/1.png", "train/dog/2.png", "test/cat/3.png", "loose.png"])
    refs = ImageFolderSource(root, split=["train", "test"]).refs()
    assert [(r.uid, r.label) for r in refs] == [("test/cat/3.png", "cat"), ("train/cat/1.png", "cat"), ("train/dog/2.png", "dog")]
    assert all(r.label is None for r in ImageFolderSource(root).refs())  # a loose file: no labels
    assert not ImageFolderSource(root).refs().has_labels()
    with pytest.raises(SourceError, match="1 image.*'loose.png'"):
        ImageFolderSource(root, labels_from_subfolders=True).refs()


def test_the_same_split_twice_is_a_duplicate_uid_with_its_locations(tmp_path: Path) -> None:
    root = _folder(tmp_path / "root", ["train/cat/1.png"])
    with pytest.raises(ValueError, match=r"1 uid\(s\) occur more than once: 'train/cat/1.png' at .*1.png, .*1.png"):
        ImageFolderSource(root, split=["train", "train"]).refs()


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that takes any bytes in a name")
def test_a_file_name_that_is_not_utf8_is_one_error_naming_it(tmp_path: Path) -> None:
    root = _folder(tmp_path / "root", ["a/ok.png"])
    (root / "a").joinpath(os.fsdecode(b"bad\xff.png")).write_bytes(b"x")
    with pytest.raises(SourceError, match=r"b'a/bad\\xff.png' is not valid UTF-8"):
        ImageFolderSource(root).refs()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    _write_tar(path, members)
    return path


def test_webdataset_refs_carry_their_member_and_are_read_without_an_index(tmp_path: Path) -> None:
    path = _tar(tmp_path / "s.tar", [("k1.jpg", b"one"), ("k1.cls", b"3"), ("k2.png", b"twotwo"), ("k2.txt", b"cap")])
    src = WebDatasetSource(str(path))
    refs = src.refs()
    assert refs.frame.columns == ["uid", "location", "label", "caption", "size", "offset"]
    assert [(r.uid, r.label, r.caption) for r in refs] == [("k1", "3", None), ("k2", None, "cap")]
    worker = pickle.loads(pickle.dumps(src))  # a worker: no listing, no member index
    assert worker._refs is None and worker._index == {}
    assert [worker.read_bytes(r) for r in pickle.loads(pickle.dumps(refs.take([1, 0])))] == [b"twotwo", b"one"]
    assert worker._index == {}  # the refs carried their offsets
    # a ref made elsewhere, from the location only, is found by indexing its tar once
    assert worker.read_bytes(SampleRef("k2", f"{path}::k2.png")) == b"twotwo" and len(worker._index) == 4
    size, token = refs.stats()
    assert size.tolist() == [3, 6] and (token > 0).all()


def test_table_listing_is_columns(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"p")
    pq.write_table(pa.table({"path": [f"img/{i}.png" for i in (2, 0, 1)], "id": [7, 8, 9], "cls": ["a", None, "b"]}),
                   tmp_path / "t.parquet")
    refs = TableSource(tmp_path / "t.parquet", uid_column="id", label_column="cls").refs()
    assert isinstance(refs, Listing) and refs.stats() is None  # stat'ed by change detection, chunk by chunk
    assert list(refs) == [SampleRef("7", str(tmp_path / "img" / "2.png"), "a"), SampleRef("8", str(tmp_path / "img" / "0.png")),
                          SampleRef("9", str(tmp_path / "img" / "1.png"), "b")]
    frame = listing_frame(refs, None)
    assert frame["size"].to_list() == [1, 1, 1]


CHILD = """
import json, sys, tracemalloc
tracemalloc.start()
from pipeline.sources import ImageFolderSource
ImageFolderSource(sys.argv[2]).refs()  # warm-up: imports and first-use caches are not the listing
src = ImageFolderSource(sys.argv[1])
before = tracemalloc.get_traced_memory()[0]
refs = src.refs()
held = tracemalloc.get_traced_memory()[0] - before
shard = refs.take(list(range(100)))
print(json.dumps({"rows": len(refs), "held": held, "uids": [r.uid for r in shard][:2]}))
"""


def test_listing_holds_no_python_object_per_file(tmp_path: Path) -> None:
    """tracemalloc counts Python allocations only: the old list of SampleRefs held ~250 bytes a file; the columns live
    in polars' own memory. 30k files: the Python memory held after listing must not grow with them."""
    n = 30_000
    root = tmp_path / "root"
    for d in range(30):
        (root / f"c{d % 3}" / f"d{d:02d}").mkdir(parents=True)
        for i in range(1000):
            open(root / f"c{d % 3}" / f"d{d:02d}" / f"{d * 1000 + i:06d}.png", "wb").close()
    small = root.parent / "small" / "c"
    small.mkdir(parents=True)
    (small / "x.png").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(small.parent)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rows"] == n and out["uids"] == ["c0/d00/000000.png", "c0/d00/000001.png"]
    assert out["held"] < 10 * n, f"{out['held']} bytes of Python objects held for {n} files"  # old code: ~250 a file
