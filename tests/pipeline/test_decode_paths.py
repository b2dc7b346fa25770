"""Decode paths of the embedder: selection (nvJPEG only on CUDA), the fast CPU path against the reference path, the
device-decode branch of the loop with its CPU fallback (run here with torchvision's CPU decoder standing in for
nvJPEG: the same code, another device), EXIF orientation on tensors, and the decode path in the store identity."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode import decode_image, peek_jpeg
from pipeline.embed import ClipEmbedder, embed_refs
from pipeline.embed import device_decode
from pipeline.embed.device_decode import choose_decode_path, decode_jpegs, orient, resize_center_crop
from pipeline.sources import ImageFolderSource

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), np.sin(4 * (xx + yy))], -1)
    arr = (127 + 100 * base + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------------ selection
def test_auto_picks_nvjpeg_only_on_cuda_with_a_working_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_decode_path("auto", CPU) == "cpu"
    monkeypatch.setattr(device_decode, "nvjpeg_available", lambda device_type="cuda": device_type == "cuda")
    assert choose_decode_path("auto", CUDA) == "nvjpeg"
    assert choose_decode_path("auto", CPU) == "cpu"
    assert choose_decode_path("auto", CUDA, resize_mode="squash") == "cpu"  # a geometry the GPU resize does not do
    assert choose_decode_path("cpu", CUDA) == "cpu"  # the knob that turns it off
    assert choose_decode_path("reference", CUDA) == "reference"
    monkeypatch.setattr(device_decode, "nvjpeg_available", lambda device_type="cuda": False)
    assert choose_decode_path("auto", CUDA) == "cpu"  # CUDA without nvJPEG falls back


def test_explicit_nvjpeg_that_cannot_run_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_decode_path("nvjpeg", CPU)
    with pytest.raises(ValueError, match="not one of"):
        choose_decode_path("gpu", CPU)
    if not torch.cuda.is_available():
        assert device_decode.nvjpeg_available("cuda") is False


def test_peek_jpeg_takes_rgb_and_grey_jpegs_only() -> None:
    assert peek_jpeg(_jpeg(_photo(64, 48))) is not None
    assert peek_jpeg(_jpeg(_photo(64, 48).convert("L"))) is not None
    assert peek_jpeg(_jpeg(_photo(64, 48).convert("CMYK"))) is None  # Adobe CMYK: Pillow's job
    png = io.BytesIO()
    _photo(64, 48).save(png, "PNG")
    assert peek_jpeg(png.getvalue()) is None
    assert peek_jpeg(_jpeg(_photo(64, 48)), max_pixels=1000) is None
    assert peek_jpeg(b"\xff\xd8\xff" + b"\0" * 20) is None


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_orientation_matches_pillow(orientation: int) -> None:
    from pipeline.decode import _ORIENTATION_FIX

    im = _photo(7, 5, seed=orientation)
    want = im.transpose(_ORIENTATION_FIX[orientation]) if orientation in _ORIENTATION_FIX else im
    got = orient(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), np.asarray(want))


def test_draft_decode_covers_the_input_and_shrinks_the_work() -> None:
    data = _jpeg(_photo(1024, 768))
    ref = decode_image(data)
    fast = decode_image(data, cover=224)
    assert ref.image.size == (1024, 768) and (fast.width, fast.height) == (1024, 768)
    assert fast.image.size == (512, 384)  # DCT scale 1/2: the smallest that keeps 224 on the short side
    assert min(decode_image(_jpeg(_photo(2048, 1536)), cover=224).image.size) >= 224
    small = _photo(200, 150)
    assert decode_image(_jpeg(small), cover=224).image.size == (200, 150)  # never upscaled


def test_tensor_resizes_match_the_pil_transform(tiny_clip_model: str) -> None:
    """The workers' uint8 tensor resize (cpu path) and the device resize (nvjpeg path) against open_clip's PIL one."""
    ref = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="reference")
    fast = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="cpu")
    assert type(fast.preprocess).__name__ == "TensorResizeCrop"
    for w, h in ((300, 200), (200, 300), (64, 64), (50, 40)):
        img = _photo(w, h)
        want = ref.preprocess(img).numpy().astype(int)  # PIL resize + centre crop → uint8
        workers = fast.preprocess(img).numpy().astype(int)
        device = resize_center_crop(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), fast.input_size).numpy()
        assert workers.shape == device.shape == want.shape == (3, 64, 64)
        assert np.abs(workers - want).max() <= 1  # same geometry; Pillow and torch round differently
        assert np.abs(device.astype(int) - want).mean() < 1.5


# ------------------------------------------------------------------------------------------------ the loop
@pytest.fixture()
def jpeg_folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        (d / f"p{i}.jpg").write_bytes(_jpeg(_photo(320 + 40 * i, 240, seed=i)))
    _photo(300, 200, seed=9).save(d / "x.png")  # another format: CPU path in the workers
    (d / "cmyk.jpg").write_bytes(_jpeg(_photo(200, 200, seed=5).convert("CMYK")))  # nvJPEG is not given CMYK
    good = _jpeg(_photo(320, 240, seed=7))
    (d / "broken.jpg").write_bytes(good[: len(good) // 3])  # header fine, data cut: the device decoder refuses
    rotated = _photo(320, 240, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (d / "rot.jpg").write_bytes(_jpeg(rotated, exif=exif.tobytes()))
    return d


def test_device_decode_branch_falls_back_to_the_cpu(tiny_clip_model: str, jpeg_folder: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The nvJPEG branch of embed_refs, on the CPU (torchvision's CPU decode_jpeg in place of nvJPEG)."""
    torch.manual_seed(0)
    cpu = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="cpu")
    dev = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="cpu")
    dev.model.load_state_dict(cpu.model.state_dict())
    dev.decode_path = "nvjpeg"  # what choose_decode_path gives on CUDA; the branch runs on any device
    calls: list[int] = []
    real = device_decode.decode_jpegs
    monkeypatch.setattr(device_decode, "decode_jpegs", lambda datas, device: calls.append(len(datas)) or real(datas, device))
    source = ImageFolderSource(jpeg_folder)
    refs = source.refs()
    a = embed_refs(source, refs, cpu, batch_size=4, num_workers=0, image_stats=lambda im, **kw: {"w": kw["width"]})
    b = embed_refs(source, refs, dev, batch_size=4, num_workers=0, image_stats=lambda im, **kw: {"w": kw["width"]})
    assert sum(calls) == 8  # the six photos, rot.jpg and broken.jpg went to the device decoder; not x.png, not cmyk.jpg
    by_uid = {m["uid"]: m for m in b.meta}
    assert by_uid["broken.jpg"]["status"] == "corrupt"  # refused on the device, the CPU path's verdict recorded
    assert [m["status"] for m in a.meta] == [m["status"] for m in b.meta]
    assert [(m["width"], m["height"]) for m in a.meta] == [(m["width"], m["height"]) for m in b.meta]
    assert by_uid["rot.jpg"]["width"] == 240  # EXIF 6: displayed 240 wide
    assert (a.ok_mask == b.ok_mask).all() and a.n_ok == len(refs) - 1
    cos = (a.embeddings * b.embeddings).sum(1)
    assert cos.min() > 0.98, cos  # same geometry, other decoder and resize kernel
    assert [s is None for s in b.stats] == [m["status"] != "ok" for m in b.meta]


def test_fast_cpu_path_close_to_the_reference(tiny_clip_model: str, jpeg_folder: Path) -> None:
    torch.manual_seed(0)
    ref = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="reference")
    fast = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="cpu")
    fast.model.load_state_dict(ref.model.state_dict())
    assert ref.decode_cover is None and fast.decode_cover == 64
    assert ref.describe()["decode"] == "reference" and fast.describe()["decode"] == "cpu"
    source = ImageFolderSource(jpeg_folder)
    a = embed_refs(source, source.refs(), ref, batch_size=4, num_workers=0)
    b = embed_refs(source, source.refs(), fast, batch_size=4, num_workers=0)
    assert (a.ok_mask == b.ok_mask).all()
    assert (a.embeddings * b.embeddings).sum(1).min() > 0.98


def test_store_identity_carries_the_decode_path(tiny_clip_model: str, tmp_path: Path) -> None:
    from pipeline.store import EmbeddingStore, StoreInfo

    emb = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="cpu")
    store = EmbeddingStore(tmp_path / "store")
    store.init(StoreInfo(dim=emb.dim, dtype="float32", embedder=emb.describe(), source={"kind": "test"}, shard_size=4,
                         n_shards=1))
    other = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="reference").describe()
    with pytest.raises(Exception, match="decode|embedder"):
        store.init(StoreInfo(dim=emb.dim, dtype="float32", embedder=other, source={"kind": "test"}, shard_size=4,
                             n_shards=1))
