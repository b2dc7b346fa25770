"""decode_image on real files written here (bad inputs, odd modes, big images) and on the shared photos."""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.decode import STATUSES, DecodeResult, decode_image, sha1_hex
from pipeline.sources import ImageFolderSource


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A greyscale PNG whose header claims width×height but whose pixel data is tiny (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _png_chunk(b"IEND", b""))


SIXTEEN_BIT = np.array([[0, 1000, 25700, 32896, 50000, 65535]], dtype=np.uint16)


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # index 0 red, index 1 blue
    im.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    return im


def _two_halves() -> Image.Image:
    """40×20: left half red, right half blue."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    return im


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs")
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0] = [[0, 0, 255, 0], [0, 0, 255, 255], [255, 0, 0, 128]]
    rgba[1] = [[0, 255, 0, 255]] * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    files = {
        "empty.jpg": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "truncated.jpg": _encode(_noise(256, 192), "JPEG", quality=90)[:6000],
        "random.png": np.random.default_rng(1).bytes(4096),
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95),
        "sixteen_bit.png": _encode(Image.fromarray(SIXTEEN_BIT), "PNG"),
        "palette_trns.png": _encode(_palette_with_transparency(), "PNG", transparency=0),
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la.png": _encode(Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA"), "PNG"),
        "grey.jpg": _encode(Image.new("L", (33, 17), 90), "JPEG", quality=95),
        "bilevel.png": _encode(Image.new("1", (8, 8), 1), "PNG"),
        "exif_rotated.jpg": _encode(_two_halves(), "JPEG", quality=95, exif=exif.tobytes()),
        "bomb_header.png": _png_header_only(30000, 30000),
        "large.jpg": _encode(Image.new("RGB", (9000, 7000), (200, 30, 60)), "JPEG", quality=90),
        "small.gif": _encode(Image.new("RGB", (10, 6), (0, 128, 0)).convert("P"), "GIF"),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


EXPECTED_STATUS = {
    "empty.jpg": "empty",
    "text.jpg": "not_image",
    "truncated.jpg": "corrupt",
    "random.png": "not_image",
    "cmyk.jpg": "ok",
    "sixteen_bit.png": "ok",
    "palette_trns.png": "ok",
    "rgba.png": "ok",
    "la.png": "ok",
    "grey.jpg": "ok",
    "bilevel.png": "ok",
    "exif_rotated.jpg": "ok",
    "bomb_header.png": "too_large",
    "large.jpg": "ok",
    "small.gif": "ok",
}


def _decode_file(d: Path, name: str, **kw) -> DecodeResult:
    return decode_image((d / name).read_bytes(), **kw)


def test_bad_inputs_folder_statuses(bad_inputs: Path) -> None:
    # Through the image folder source, as the ingest stage reads them.
    src = ImageFolderSource(bad_inputs)
    got = {ref.uid: decode_image(src.read_bytes(ref), max_side=1024).status for ref in src.refs()}
    assert got == EXPECTED_STATUS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never switch on the global


def test_ok_results_are_rgb_and_failures_carry_no_image(bad_inputs: Path) -> None:
    for name in EXPECTED_STATUS:
        r = _decode_file(bad_inputs, name, max_side=1024)
        assert r.status in STATUSES
        if r.status == "ok":
            assert r.image is not None and r.image.mode == "RGB" and r.ok
            assert r.image.size[0] > 0 and r.width > 0 and r.height > 0
        else:
            assert r.image is None and not r.ok


def test_truncated_jpeg_reports_header_size(bad_inputs: Path) -> None:
    r = _decode_file(bad_inputs, "truncated.jpg")
    assert (r.status, r.width, r.height) == ("corrupt", 256, 192)


def test_empty_and_not_image_have_unknown_size(bad_inputs: Path) -> None:
    for name in ("empty.jpg", "text.jpg", "random.png"):
        r = _decode_file(bad_inputs, name)
        assert (r.width, r.height) == (0, 0)


def test_cmyk_jpeg_becomes_rgb_red(bad_inputs: Path) -> None:
    r = _decode_file(bad_inputs, "cmyk.jpg")
    px = np.asarray(r.image).reshape(-1, 3).astype(int)
    assert np.abs(px - [255, 0, 0]).max() <= 3


def test_sixteen_bit_png_is_scaled_not_clipped(bad_inputs: Path) -> None:
    # Pillow's own convert("L") clips everything above 255 to white; we must divide by 257.
    assert Image.open(bad_inputs / "sixteen_bit.png").mode in ("I;16", "I")
    r = _decode_file(bad_inputs, "sixteen_bit.png")
    arr = np.asarray(r.image)
    expected = np.rint(SIXTEEN_BIT[0] / 257.0).astype(np.uint8)  # 0, 4, 100, 128, 195, 255
    np.testing.assert_array_equal(arr[0, :, 0], expected)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_palette_transparency_composited_on_white(bad_inputs: Path) -> None:
    arr = np.asarray(_decode_file(bad_inputs, "palette_trns.png").image)
    indices = np.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(arr[indices == 0], np.full(((indices == 0).sum(), 3), 255))
    np.testing.assert_array_equal(arr[indices == 1], np.tile([0, 0, 255], ((indices == 1).sum(), 1)))


def test_rgba_and_la_composited_on_white(bad_inputs: Path) -> None:
    arr = np.asarray(_decode_file(bad_inputs, "rgba.png").image).astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]  # fully transparent blue → white
    assert arr[0, 1].tolist() == [0, 0, 255]  # opaque blue stays blue
    assert np.abs(arr[0, 2] - [255, 127, 127]).max() <= 1  # half-transparent red over white
    assert arr[1].tolist() == [[0, 255, 0]] * 3
    la = np.asarray(_decode_file(bad_inputs, "la.png").image).astype(int)
    assert la[0, 0].tolist() == [255, 255, 255] and la[0, 1].tolist() == [50, 50, 50]


def test_greyscale_and_bilevel_become_rgb(bad_inputs: Path) -> None:
    grey = np.asarray(_decode_file(bad_inputs, "grey.jpg").image).astype(int)
    assert grey.shape == (17, 33, 3) and np.abs(grey - 90).max() <= 2
    bilevel = np.asarray(_decode_file(bad_inputs, "bilevel.png").image)
    assert bilevel.shape == (8, 8, 3) and (bilevel == 255).all()


def test_exif_orientation_applied(bad_inputs: Path) -> None:
    r = _decode_file(bad_inputs, "exif_rotated.jpg")
    # Stored 40×20 (left red, right blue), orientation 6: displayed 20×40 with red on top.
    assert r.image.size == (20, 40) and (r.width, r.height) == (20, 40)
    top, bottom = np.asarray(r.image)[5, 10].astype(int), np.asarray(r.image)[34, 10].astype(int)
    assert np.abs(top - [255, 0, 0]).max() <= 4 and np.abs(bottom - [0, 0, 255]).max() <= 4


def test_large_jpeg_decoded_reduced(bad_inputs: Path) -> None:
    r = _decode_file(bad_inputs, "large.jpg", max_side=1024)
    assert (r.status, r.width, r.height) == ("ok", 9000, 7000)
    assert max(r.image.size) <= 1024 and max(r.image.size) >= 1000
    assert abs(r.image.size[0] / r.image.size[1] - 9000 / 7000) < 0.01
    centre = np.asarray(r.image)[r.image.size[1] // 2, r.image.size[0] // 2].astype(int)
    assert np.abs(centre - [200, 30, 60]).max() <= 3
    assert max(_decode_file(bad_inputs, "large.jpg").image.size) == 4096  # default max_side


def test_bomb_sized_header_is_too_large_with_size(bad_inputs: Path) -> None:
    r = _decode_file(bad_inputs, "bomb_header.png")
    assert (r.status, r.width, r.height) == ("too_large", 30000, 30000)


def test_big_jpeg_beyond_pillow_bomb_limit_still_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Scale Pillow's limit down so a cheap image plays the part of a legitimate 20000×10000 photo.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    jpeg = _encode(Image.new("RGB", (3000, 2000), (10, 120, 240)), "JPEG", quality=90)
    png = _encode(Image.new("RGB", (3000, 2000), (10, 120, 240)), "PNG")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(jpeg))  # what plain Pillow does with it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        r = decode_image(jpeg, max_side=500)
        assert (r.status, r.width, r.height) == ("ok", 3000, 2000) and max(r.image.size) == 500
        # PNG has no reduced decode: 6M pixels > the 2M budget → too_large, not an exception.
        assert decode_image(png, max_side=500).status == "too_large"
        assert decode_image(png, max_side=500, max_pixels=10_000_000).status == "ok"
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # read, never written


def test_max_side_respected_for_non_jpeg() -> None:
    r = decode_image(_encode(_noise(900, 300), "PNG"), max_side=256)
    assert r.image.size == (256, 85) and (r.width, r.height) == (900, 300)


def test_mutated_bytes_never_raise() -> None:
    rng = np.random.default_rng(7)
    seeds = [_encode(_noise(48, 32), "JPEG"), _encode(_noise(48, 32), "PNG"), _encode(_noise(48, 32), "WEBP")]
    seen = set()
    for i in range(90):
        data = bytearray(seeds[i % 3])
        if i % 2:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            pos = rng.integers(0, len(data), size=8)
            data_np = np.frombuffer(bytes(data), dtype=np.uint8).copy()
            data_np[pos] = rng.integers(0, 256, size=8, dtype=np.uint8)
            data = bytearray(data_np.tobytes())
        r = decode_image(bytes(data))
        assert r.status in STATUSES
        assert (r.image is not None) == (r.status == "ok")
        seen.add(r.status)
    assert "corrupt" in seen  # the mutations did exercise the failure path


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="max_side"):
        decode_image(b"x", max_side=0)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)


def test_sha1_hex() -> None:
    assert sha1_hex(b"abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"  # FIPS 180 test vector
    assert sha1_hex(b"") == hashlib.sha1(b"").hexdigest()


def test_shared_photos_all_decode(shared_data: Path) -> None:
    photos = sorted((shared_data / "images" / "photos").iterdir())
    assert len(photos) >= 20
    for path in photos:
        r = decode_image(path.read_bytes(), max_side=512)
        assert r.status == "ok", path.name
        assert r.image.mode == "RGB" and max(r.image.size) <= 512
        with Image.open(path) as im:
            assert (r.width, r.height) == im.size, path.name
            if max(im.size) <= 512 and im.mode == "RGB":  # untouched RGB → identical pixels
                np.testing.assert_array_equal(np.asarray(r.image), np.asarray(im.convert("RGB")))
