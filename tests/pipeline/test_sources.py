"""Sources on real files: the shared CIFAR image folder, tars, tables and embedding shards written by the tests."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.sources import (
    DuplicateUidError,
    ImageFolderSource,
    PrecomputedSource,
    SampleRef,
    SourceError,
    TableSource,
    WebDatasetSource,
    check_unique_uids,
    source_from_config,
)


def _jpeg(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7), seed % 256, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _roundtrip(src):
    """describe() is JSON-serialisable and rebuilds an equivalent source."""
    cfg = json.loads(json.dumps(src.describe()))
    assert cfg["kind"] == src.kind
    return source_from_config(cfg)


# ----------------------------------------------------------------------------------------------------- image folder
def test_image_folder_cifar_train_split(cifar_subset: Path) -> None:
    src = ImageFolderSource(cifar_subset, split="train")
    refs = src.refs()
    assert len(refs) == 500
    assert Counter(r.label for r in refs) == {c: 50 for c in sorted(p.name for p in (cifar_subset / "train").iterdir())}
    assert [r.uid for r in refs] == sorted(r.uid for r in refs)
    for r in refs:
        parts = r.uid.split("/")
        assert parts[0] == "train" and parts[1] == r.label and len(parts) == 3
        assert Path(r.location) == cifar_subset / r.uid
    assert src.read_bytes(refs[0]) == (cifar_subset / refs[0].uid).read_bytes()
    assert refs[0].uid == "train/airplane/0000.jpg"


def test_image_folder_cifar_all_splits_and_split_root(cifar_subset: Path) -> None:
    both = ImageFolderSource(cifar_subset, split=["train", "test"]).refs()
    assert len(both) == 700 and len({r.uid for r in both}) == 700  # file names repeat across splits, uids do not
    assert Counter(r.label for r in both) == {c: 70 for c in {r.label for r in both}}
    # Pointing at the split folder itself: uids relative to it, same labels.
    split_root = ImageFolderSource(cifar_subset / "test").refs()
    assert len(split_root) == 200 and split_root[0].uid == "airplane/0000.jpg" and split_root[0].label == "airplane"
    # Pointing at the top: the first level (the split) is what labels would be, as documented.
    assert {r.label for r in ImageFolderSource(cifar_subset).refs()} == {"train", "test"}
    with pytest.raises(SourceError, match="valid"):
        ImageFolderSource(cifar_subset, split="valid")


def test_image_folder_detection_extensions_hidden(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog" / "deep").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    (tmp_path / "cat" / "a.JPG").write_bytes(_jpeg(0))
    (tmp_path / "cat" / "b.png").write_bytes(_png(1))
    (tmp_path / "dog" / "deep" / "c.jpeg").write_bytes(_jpeg(2))
    (tmp_path / "cat" / "notes.txt").write_text("not listed")
    (tmp_path / "cat" / "._a.JPG").write_bytes(b"macOS resource fork")
    (tmp_path / ".cache" / "x.jpg").write_bytes(_jpeg(3))
    refs = ImageFolderSource(tmp_path).refs()
    assert [(r.uid, r.label) for r in refs] == [("cat/a.JPG", "cat"), ("cat/b.png", "cat"), ("dog/deep/c.jpeg", "dog")]
    assert all(r.label is None for r in ImageFolderSource(tmp_path, labels_from_subfolders=False).refs())
    assert [r.uid for r in ImageFolderSource(tmp_path, extensions=["png"]).refs()] == ["cat/b.png"]

    (tmp_path / "loose.jpg").write_bytes(_jpeg(4))
    auto = ImageFolderSource(tmp_path).refs()
    assert len(auto) == 4 and all(r.label is None for r in auto)  # not every image is in a class folder
    with pytest.raises(SourceError, match="loose.jpg"):
        ImageFolderSource(tmp_path, labels_from_subfolders=True).refs()
    with pytest.raises(SourceError, match="not a directory"):
        ImageFolderSource(tmp_path / "missing")


def test_image_folder_pickles_and_rebuilds_from_config(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "b"]):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(i))
    src = ImageFolderSource(tmp_path, split=None)
    refs = src.refs()
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read_bytes(refs[1]) == (tmp_path / "b" / "1.jpg").read_bytes()
    assert clone.refs() == refs and _roundtrip(src).refs() == refs
    with pytest.raises(FileNotFoundError):
        src.read_bytes(SampleRef("gone", str(tmp_path / "gone.jpg")))


# ------------------------------------------------------------------------------------------------------- webdataset
@pytest.fixture()
def shards(tmp_path: Path) -> list[Path]:
    paths = []
    for s in range(3):
        members: list[tuple[str, bytes]] = []
        for i in range(4):
            key = f"s{s}_{i:03d}"
            img_name, img = (f"{key}.png", _png(10 * s + i)) if i == 3 else (f"{key}.jpg", _jpeg(10 * s + i))
            members += [(img_name, img), (f"{key}.cls", f"{i % 2}\n".encode()), (f"{key}.txt", f"caption {s} {i}".encode())]
        members.append((f"dir/s{s}_x.seg.jpg", _jpeg(100 + s)))  # key with a folder and a multi-dot extension
        members.append((f"s{s}_meta_only.json", b"{}"))  # no image: skipped
        members.append(("__index__", b"ignored by webdataset"))
        path = tmp_path / f"shard-{s:03d}.tar"
        _write_tar(path, members)
        paths.append(path)
    return paths


def test_webdataset_refs_labels_captions(shards: list[Path]) -> None:
    src = WebDatasetSource(str(shards[0].parent / "shard-{000..002}.tar"), image_keys=("jpg", "png", "seg.jpg"))
    refs = src.refs()
    assert len(refs) == 15
    by_uid = {r.uid: r for r in refs}
    r = by_uid["s1_002"]
    assert (r.label, r.caption) == ("0", "caption 1 2")
    assert r.location == f"{shards[1]}::s1_002.jpg"
    assert by_uid["s2_003"].location.endswith("::s2_003.png")
    assert by_uid["dir/s0_x"].label is None and by_uid["dir/s0_x"].location.endswith("::dir/s0_x.seg.jpg")
    with tarfile.open(shards[2]) as tar:
        for ref in refs:
            if ref.location.startswith(str(shards[2])):
                assert src.read_bytes(ref) == tar.extractfile(ref.location.split("::")[1]).read()
    # The default image keys do not include "seg.jpg": those samples are skipped.
    assert len(WebDatasetSource([str(p) for p in shards]).refs()) == 12


def test_webdataset_file_url_matches_local(shards: list[Path]) -> None:
    local = WebDatasetSource([str(p) for p in shards]).refs()
    url_src = WebDatasetSource(f"file://{shards[0].parent}/shard-{{000..002}}.tar")
    remote = url_src.refs()
    assert [r.uid for r in remote] == [r.uid for r in local]
    assert remote[5].location.startswith("file://")
    assert url_src.read_bytes(remote[5]) == WebDatasetSource([str(p) for p in shards]).read_bytes(local[5])


def test_webdataset_keys_match_the_webdataset_library(shards: list[Path]) -> None:
    wds = pytest.importorskip("webdataset")
    ours = [r.uid for r in WebDatasetSource([str(p) for p in shards], image_keys=("jpg", "png", "seg.jpg")).refs()]
    theirs = [s["__key__"] for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False)
              if {"jpg", "png", "seg.jpg"} & set(s)]
    assert ours == theirs


def test_webdataset_reads_by_offset_without_rescanning(shards: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src = WebDatasetSource([str(p) for p in shards])
    refs = src.refs()
    expected = {}
    for p in shards:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                expected[f"{p}::{m.name}"] = tar.extractfile(m).read()
    clone = pickle.loads(pickle.dumps(src))  # what a DataLoader worker receives

    def no_tar(*a, **k):
        raise AssertionError("tar rescanned")

    monkeypatch.setattr(tarfile, "open", no_tar)
    for ref in refs[::-1]:
        assert src.read_bytes(ref) == expected[ref.location]
        assert clone.read_bytes(ref) == expected[ref.location]
    monkeypatch.undo()
    # A source rebuilt from its description has no index yet: it indexes each tar once, lazily.
    fresh = _roundtrip(src)
    assert fresh.read_bytes(refs[-1]) == expected[refs[-1].location]
    with pytest.raises(FileNotFoundError):
        fresh.read_bytes(SampleRef("nope", f"{shards[0]}::nope.jpg"))


def test_webdataset_duplicate_key_across_tars(tmp_path: Path) -> None:
    _write_tar(tmp_path / "a.tar", [("k1.jpg", _jpeg(1)), ("k2.jpg", _jpeg(2))])
    _write_tar(tmp_path / "b.tar", [("k2.jpg", _jpeg(3)), ("k3.jpg", _jpeg(4))])
    with pytest.raises(DuplicateUidError, match="'k2'") as err:
        WebDatasetSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]).refs()
    assert "a.tar::k2.jpg" in str(err.value) and "b.tar::k2.jpg" in str(err.value)
    assert err.value.duplicates == ["k2"] and err.value.count == 1


def test_webdataset_bad_shards(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("k.jpg")
        data = _jpeg(0)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError, match="uncompressed"):
        WebDatasetSource(str(tmp_path / "c.tar.gz")).refs()
    with pytest.raises(SourceError, match="not found"):
        WebDatasetSource(str(tmp_path / "missing-{0..1}.tar")).refs()


# ----------------------------------------------------------------------------------------------------------- tables
@pytest.fixture()
def table_dir(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpeg(i))
    return tmp_path


def test_table_parquet(table_dir: Path) -> None:
    pq.write_table(
        pa.table({"file": [f"imgs/{i}.jpg" for i in range(4)], "id": ["u3", "u2", "u1", "u0"],
                  "y": [0, 1, 0, 1], "text": ["a", None, "c", "d"]}),
        table_dir / "list.parquet",
    )
    src = TableSource(table_dir / "list.parquet", path_column="file", uid_column="id", label_column="y",
                      caption_column="text")
    refs = src.refs()
    assert [r.uid for r in refs] == ["u3", "u2", "u1", "u0"]  # table order
    assert [r.label for r in refs] == ["0", "1", "0", "1"] and refs[1].caption is None
    assert refs[2].location == str(table_dir / "imgs" / "2.jpg")
    assert src.read_bytes(refs[2]) == (table_dir / "imgs" / "2.jpg").read_bytes()
    assert _roundtrip(src).refs() == refs


def test_table_csv_uid_is_path_as_written_and_strings_kept(table_dir: Path) -> None:
    sub = table_dir / "lists"
    sub.mkdir()
    (sub / "list.csv").write_text("path,code\n../imgs/0.jpg,0001\n../imgs/1.jpg,0002\n")
    refs = TableSource(sub / "list.csv").refs()  # root defaults to the table's folder
    assert [r.uid for r in refs] == ["../imgs/0.jpg", "../imgs/1.jpg"]
    assert refs[0].location == str(table_dir / "imgs" / "0.jpg")
    coded = TableSource(sub / "list.csv", uid_column="code").refs()
    assert [r.uid for r in coded] == ["0001", "0002"]  # not parsed as integers
    # The same relative path with an explicit root is an escape.
    with pytest.raises(SourceError, match=r"\.\./imgs/0\.jpg"):
        TableSource(sub / "list.csv", root=sub).refs()


def test_table_root_escapes_rejected(table_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jpg").write_bytes(_jpeg(9))
    os.symlink(outside / "secret.jpg", table_dir / "imgs" / "link.jpg")
    root = table_dir / "imgs"
    cases = {
        "dotdot": "../imgs/../escaped.jpg",
        "absolute": str(outside / "secret.jpg"),
        "symlink": "link.jpg",
        "url": "https://example.com/a.jpg",
    }
    for name, bad in cases.items():
        pq.write_table(pa.table({"path": ["0.jpg", bad]}), table_dir / f"{name}.parquet")
        with pytest.raises(SourceError, match="escapes root|outside root") as err:
            TableSource(table_dir / f"{name}.parquet", root=root).refs()
        assert repr(bad) in str(err.value), name
    pq.write_table(pa.table({"path": ["0.jpg", "sub/../1.jpg", str(root / "2.jpg")]}), table_dir / "ok.parquet")
    ok = TableSource(table_dir / "ok.parquet", root=root).refs()
    assert [r.location for r in ok] == [str(root / f"{i}.jpg") for i in range(3)]


def test_table_missing_column_and_repeated_uid(table_dir: Path) -> None:
    pq.write_table(pa.table({"path": ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg"], "id": ["a", "b", "a"]}),
                   table_dir / "t.parquet")
    with pytest.raises(SourceError, match="'label'"):
        TableSource(table_dir / "t.parquet", label_column="label").refs()
    with pytest.raises(SourceError, match="'filename'"):
        TableSource(table_dir / "t.parquet", path_column="filename").refs()
    with pytest.raises(DuplicateUidError, match="'a'"):
        TableSource(table_dir / "t.parquet", uid_column="id").refs()
    (table_dir / "t.json").write_text("[]")
    with pytest.raises(SourceError, match="parquet or .csv"):
        TableSource(table_dir / "t.json").refs()


# ------------------------------------------------------------------------------------------------------ precomputed
def _write_precomputed(root: Path, sizes: list[int], dim: int = 8, dtype=np.float16) -> list[np.ndarray]:
    (root / "img_emb").mkdir()
    (root / "metadata").mkdir()
    rng = np.random.default_rng(0)
    arrays, start = [], 0
    for s, n in enumerate(sizes):
        emb = rng.standard_normal((n, dim)).astype(dtype)
        np.save(root / "img_emb" / f"img_emb_{s:04d}.npy", emb)
        keys = [f"{k:09d}" for k in range(start, start + n)]
        pq.write_table(pa.table({"key": keys, "caption": [f"c{k}" for k in keys], "url": [f"http://x/{k}" for k in keys]}),
                       root / "metadata" / f"metadata_{s:04d}.parquet")
        arrays.append(emb)
        start += n
    return arrays


def test_precomputed_round_trip(tmp_path: Path) -> None:
    arrays = _write_precomputed(tmp_path, [5, 3, 4])
    src = PrecomputedSource(str(tmp_path / "img_emb" / "*.npy"), str(tmp_path / "metadata" / "*.parquet"),
                            caption_column="caption")
    shards = list(src.iter_shards())
    assert len(shards) == 3
    for (refs, emb), expected in zip(shards, arrays):
        assert emb.dtype == np.float32 and emb.shape == expected.shape
        np.testing.assert_array_equal(emb, expected.astype(np.float32))
        assert [r.caption for r in refs] == [f"c{r.uid}" for r in refs]
    assert [r.uid for refs, _ in shards for r in refs] == [f"{k:09d}" for k in range(12)]
    assert shards[1][0][0].location == f"{src.emb_paths[1]}#0"
    assert src.refs()[0].location.endswith("img_emb_0000.npy#0") and len(src) == 12
    with_url = _roundtrip(PrecomputedSource(src.emb_paths, src.meta_paths, location_column="url"))
    assert with_url.refs()[7].location == "http://x/000000007"
    with pytest.raises(TypeError):
        src.read_bytes(src.refs()[0])


def test_precomputed_float32_is_memory_mapped(tmp_path: Path) -> None:
    arrays = _write_precomputed(tmp_path, [6], dtype=np.float32)
    src = PrecomputedSource([tmp_path / "img_emb" / "img_emb_0000.npy"], [tmp_path / "metadata" / "metadata_0000.parquet"])
    (refs, emb), = list(src.iter_shards())
    assert isinstance(emb, np.memmap) and len(refs) == 6
    np.testing.assert_array_equal(emb, arrays[0])


def test_precomputed_mismatches(tmp_path: Path) -> None:
    _write_precomputed(tmp_path, [5, 3])
    emb1 = tmp_path / "img_emb" / "img_emb_0001.npy"
    np.save(emb1, np.zeros((4, 8), dtype=np.float16))  # 4 embeddings, 3 metadata rows
    src = PrecomputedSource(str(tmp_path / "img_emb" / "*.npy"), str(tmp_path / "metadata" / "*.parquet"))
    with pytest.raises(SourceError, match="row count mismatch") as err:
        next(src.iter_shards())  # fails before yielding the (valid) first shard
    assert "img_emb_0001.npy" in str(err.value) and "metadata_0001.parquet" in str(err.value)
    with pytest.raises(SourceError, match="2 embedding file"):
        PrecomputedSource(str(tmp_path / "img_emb" / "*.npy"), [tmp_path / "metadata" / "metadata_0000.parquet"])
    with pytest.raises(SourceError, match="matches no file"):
        PrecomputedSource(str(tmp_path / "nothing" / "*.npy"), str(tmp_path / "metadata" / "*.parquet"))


def test_precomputed_duplicate_uid_across_shards(tmp_path: Path) -> None:
    _write_precomputed(tmp_path, [2, 2])
    pq.write_table(pa.table({"key": ["000000000", "000000003"]}), tmp_path / "metadata" / "metadata_0001.parquet")
    src = PrecomputedSource(str(tmp_path / "img_emb" / "*.npy"), str(tmp_path / "metadata" / "*.parquet"))
    with pytest.raises(DuplicateUidError, match="'000000000'"):
        src.refs()


# ----------------------------------------------------------------------------------------------- uids and config
def test_check_unique_uids_message() -> None:
    check_unique_uids(["a", "b", "c"])
    uids = [f"u{i}" for i in range(10)] * 2 + ["z"]
    with pytest.raises(DuplicateUidError) as err:
        check_unique_uids(uids)
    msg = str(err.value)
    assert msg.startswith("10 uid(s)") and "'u0'" in msg and "'u4'" in msg and "and 5 more" in msg
    assert "'u9'" not in msg and "'z'" not in msg
    assert err.value.count == 10 and err.value.duplicates == [f"u{i}" for i in range(5)]
    assert isinstance(err.value, ValueError)


def test_source_from_config_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source kind 'folder'.*image_folder"):
        source_from_config({"kind": "folder", "root": str(tmp_path)})
    with pytest.raises(SourceError, match="image_folder.*recursive"):
        source_from_config({"kind": "image_folder", "root": str(tmp_path), "recursive": True})
    with pytest.raises(SourceError, match="needs 'urls'"):
        source_from_config({"kind": "webdataset"})
    with pytest.raises(SourceError, match="'kind'"):
        source_from_config({"root": str(tmp_path)})
    src = source_from_config({"kind": "image_folder", "root": str(tmp_path)})
    assert isinstance(src, ImageFolderSource) and src.refs() == []
