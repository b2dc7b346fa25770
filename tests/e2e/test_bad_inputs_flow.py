"""Bad input never kills a run: a folder with every kind of broken or awkward image, through the curate flow."""
from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from flows.curate import run_curate
from pipeline.manifest import read_manifest
from pipeline.sources import DuplicateUidError


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def awkward_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    good = root / "good"
    good.mkdir(parents=True)
    for i in range(30):
        arr = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
        (good / f"{i:02d}.png").write_bytes(_png(Image.fromarray(arr)))
    (good / "copy_of_00.png").write_bytes((good / "00.png").read_bytes())  # exact duplicate
    odd = root / "odd"
    odd.mkdir()
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "text.jpg").write_text("not an image at all")
    full = _jpeg(Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)))
    (odd / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (odd / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (20, 20), (10, 200, 30, 0))))
    (odd / "sixteen.png").write_bytes(_png(Image.fromarray((rng.integers(0, 65535, size=(20, 20))).astype(np.uint16))))
    pal = Image.new("P", (20, 20))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    (odd / "palette_alpha.png").write_bytes(_png(pal))
    (odd / "rgba.png").write_bytes(_png(Image.new("RGBA", (20, 20), (0, 255, 0, 128))))
    (odd / "large.jpg").write_bytes(_jpeg(Image.new("RGB", (6000, 4500), (120, 30, 200))))
    return root


def test_every_bad_input_is_recorded_and_the_run_finishes(prefect_server, awkward_folder, tmp_path):
    config = {
        "name": "awkward",
        "source": {"kind": "image_folder", "root": str(awkward_folder), "labels_from_subfolders": False},
        "embed": {"kind": "pixels", "shard_size": 16, "num_workers": 0, "max_side": 2048, "pixels": {"size": 8, "dim": 8}},
        "index": {"k": 3},
        "steps": [{"scorer": "exact_dup"}, {"scorer": "prototype"}],
        "output_root": str(tmp_path / "runs"),
    }
    info = run_curate(config)
    m = read_manifest(tmp_path / "runs" / "awkward").sort("uid")
    status = dict(zip(m["uid"].to_list(), m["status"].to_list()))
    assert status["odd/zero.jpg"] == "empty"
    assert status["odd/text.jpg"] == "not_image"
    assert status["odd/truncated.jpg"] == "corrupt"
    for name in ("cmyk.jpg", "sixteen.png", "palette_alpha.png", "rgba.png", "large.jpg"):
        assert status[f"odd/{name}"] == "ok", name
    bad = m.filter(pl.col("reason") == "bad_input")
    assert sorted(bad["uid"].to_list()) == ["odd/text.jpg", "odd/truncated.jpg", "odd/zero.jpg"]
    assert (bad["weight"] == 0).all() and (bad["cluster"] == -1).all()
    dup = m.filter(pl.col("reason") == "exact_dup")
    assert dup["uid"].to_list() == ["good/copy_of_00.png"] and dup["dup_of"].to_list() == ["good/00.png"]
    assert info["counts"]["store_status"] == {"corrupt": 1, "empty": 1, "not_image": 1, "ok": 36}
    assert info["counts"]["by_reason"]["bad_input"] == 3
    # the report and the Prefect artifact that points to it
    assert (tmp_path / "runs" / "awkward" / "report.html").exists()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["winnow-awkward"])))
    assert artifacts and "report.html" in artifacts[0].data and "bad_input | 3" in artifacts[0].data
    # one progress bar per stage in the flow run, each finished, its description the stage's last progress line
    from prefect.client.schemas.filters import ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        bars = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[info["flow_run"]["id"]]), type=ArtifactFilterType(any_=["progress"])))
    finished = {bar.description.split(":")[0]: bar.data for bar in bars}
    assert {"embed", "index", "build manifest part"} <= set(finished), [(b.description, b.data) for b in bars]
    assert all(data == 100.0 for data in finished.values()), finished
    assert any("39/39 images (100%)" in bar.description for bar in bars), [b.description for b in bars]


def test_duplicate_uids_stop_the_run_before_any_work(prefect_server, tmp_path):
    import tarfile

    paths = []
    for shard in range(2):  # the same key in two shards: the uid 'a' twice
        paths.append(str(tmp_path / f"shard{shard}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for name in ("a.jpg", f"b{shard}.jpg"):
                data = _jpeg(Image.new("RGB", (8, 8)))
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    config = {
        "name": "dups",
        "source": {"kind": "webdataset", "urls": paths},
        "embed": {"kind": "pixels"},
        "index": {"k": 1},
        "output_root": str(tmp_path / "runs"),
    }
    with pytest.raises(DuplicateUidError, match="'a'"):
        run_curate(config)
    assert not (tmp_path / "runs" / "dups" / "store").exists()
