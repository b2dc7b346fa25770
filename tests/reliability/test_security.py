"""Untrusted files never run code (no unpickling), and paths from a table cannot leave a configured root."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sources import PrecomputedSource, SourceError, TableSource
from pipeline.store import StoreError

from ._helpers import make_store


class _Payload:
    """Unpickling this calls os.mkdir(marker): if the marker exists afterwards, a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_a_code_payload_is_refused_and_runs_nothing(tiny_clip_model, tmp_path):
    import open_clip
    import torch

    from pipeline.embed import ClipEmbedder

    marker = tmp_path / "pwned_by_checkpoint"
    state = open_clip.create_model(tiny_clip_model, pretrained=None).state_dict()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"could not load weights .*evil\.pt"):
        ClipEmbedder(tiny_clip_model, None, checkpoint=path, device="cpu")
    assert not marker.exists()
    # the same weights without the payload load fine (so the refusal above is about the payload)
    clean = tmp_path / "clean.pt"
    torch.save(state, clean)
    assert ClipEmbedder(tiny_clip_model, None, checkpoint=clean, device="cpu").dim == 32


def _object_npy(path: Path, marker: Path) -> None:
    arr = np.empty((2, 4), dtype=object)
    arr[0, 0] = _Payload(marker)
    np.save(path, arr, allow_pickle=True)
    assert b"posix" in path.read_bytes() or b"mkdir" in path.read_bytes()  # the pickle really is in the file


def test_store_shard_holding_a_pickle_is_refused_and_runs_nothing(tmp_path):
    store = make_store(tmp_path / "s")
    marker = tmp_path / "pwned_by_store"
    _object_npy(store.emb_path(0), marker)
    with pytest.raises(StoreError, match="cannot read .*00000.npy"):
        store.load()
    assert not marker.exists()


def test_precomputed_embeddings_holding_a_pickle_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned_by_precomputed"
    (tmp_path / "emb").mkdir()
    _object_npy(tmp_path / "emb" / "0.npy", marker)
    pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / "0.parquet")
    # numpy refuses before unpickling (its message does not name the file: pipeline/sources.py could add that)
    with pytest.raises(ValueError, match="allow_pickle|Python objects"):
        PrecomputedSource(str(tmp_path / "emb" / "0.npy"), str(tmp_path / "0.parquet")).refs()
    assert not marker.exists()


def test_kmeans_cache_holding_a_pickle_is_refused_and_runs_nothing(tmp_path):
    from pipeline.index import load_kmeans

    marker = tmp_path / "pwned_by_cache"
    (tmp_path / "kmeans-k.json").write_text('{"params": {"k": 2}, "used_gpu": false}')
    with open(tmp_path / "kmeans-k.npz", "wb") as fh:
        np.savez(fh, centroids=np.array([_Payload(marker)], dtype=object), assignment=np.zeros(2), similarity=np.zeros(2))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_kmeans(tmp_path, "k")
    assert not marker.exists()


def test_no_module_of_the_pipeline_unpickles_files():
    """Audit: no pickle.load / torch.load without weights_only / allow_pickle=True in the code that reads files."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for folder in ("pipeline", "scorers", "flows", "manifests"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "weights_only=False", "cloudpickle.load"):
                if needle in text:
                    offenders.append(f"{path.relative_to(root)}: {needle}")
            if "torch.load(" in text and "weights_only=True" not in text:
                offenders.append(f"{path.relative_to(root)}: torch.load without weights_only=True")
    assert offenders == []
    assert pickle  # the module is only used here, to build the payloads above


# ---- paths from a table cannot leave the configured root ------------------------------------------------------------
@pytest.fixture(scope="module")
def rooted(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rooted")
    root, outside = base / "root", base / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "x.jpg", root / "a" / "y.jpg", root / "a" / "b" / "z.jpg", outside / "secret.jpg", base / "sibling.jpg"):
        p.write_bytes(b"\xff\xd8\xff")
    os.symlink(outside, root / "a" / "out_dir")  # a link out of the root
    os.symlink(outside / "secret.jpg", root / "out_file.jpg")
    os.symlink(root / "a" / "y.jpg", root / "a" / "b" / "in_file.jpg")  # a link that stays inside
    (base / "rootish").mkdir()  # shares the root's name as a prefix: "root" vs "rootish"
    return root, base


SEGMENTS = ["..", ".", "a", "b", "x.jpg", "y.jpg", "z.jpg", "out_dir", "out_file.jpg", "in_file.jpg", "secret.jpg",
            "root", "rootish", "outside", "sibling.jpg", "", "~"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6), absolute=st.booleans(), url=st.booleans())
def test_table_paths_never_resolve_outside_the_root(rooted, tmp_path, parts, absolute, url):
    root, base = rooted
    rel = "/".join(parts)
    path = f"file://{base}/{rel}" if url else (f"{base}/{rel}" if absolute else rel)
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": ["x.jpg", path], "id": ["first", "second"]}), table)
    try:
        refs = TableSource(table, root=root, uid_column="id").refs()
    except SourceError as exc:
        assert repr(path) in str(exc) and ("escapes root" in str(exc) or "outside root" in str(exc))
        return
    real_root = os.path.realpath(root)
    for ref in refs:
        real = os.path.realpath(ref.location)
        assert os.path.commonpath([real, real_root]) == real_root, (path, real)


def test_known_escapes_are_refused(rooted, tmp_path):
    root, base = rooted
    for bad in ("../sibling.jpg", "a/../../outside/secret.jpg", "a/out_dir/secret.jpg", "out_file.jpg",
                "../rootish/../outside/secret.jpg", str(base / "outside" / "secret.jpg"), "file:///etc/passwd"):
        pq.write_table(pa.table({"path": [bad]}), tmp_path / "t.parquet")
        with pytest.raises(SourceError, match="escapes root|outside root"):
            TableSource(tmp_path / "t.parquet", root=root).refs()
    pq.write_table(pa.table({"path": ["a/b/../y.jpg", "a/b/in_file.jpg", str(root / "x.jpg")]}), tmp_path / "ok.parquet")
    assert len(TableSource(tmp_path / "ok.parquet", root=root).refs()) == 3
