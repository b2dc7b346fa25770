"""Peak memory of decoding hostile images, measured in a fresh subprocess (ru_maxrss), against the documented bound.

The nasty set (issue #18): PNGs just under Pillow's bomb limit, 13000×13000, that are tiny on disk: one palette
image and one grey+alpha image. Decoding them used to convert at full size before shrinking (2.7 GB and 3.2 GB).
The PNGs are written here row by row through zlib, so the test process itself never holds the pixels.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import BAND_WORK_BYTES, decode_image, default_max_pixels, memory_bound_bytes

REPO = Path(__file__).resolve().parents[2]
SIDE = 13_000


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def write_png(path: Path, side: int, *, colour_type: int, channels: int, extra_chunks: bytes = b"") -> Path:
    """A side×side 8-bit PNG of diagonal stripes, streamed: one row in memory at a time."""
    comp = zlib.compressobj(1)
    idat = bytearray()
    period = 97 * 7
    x = np.arange(side + period, dtype=np.int64)
    line = np.repeat((x // 97 % 7 * 37).astype(np.uint8), channels)  # values 0..222: palette indices all defined
    for y in range(side):
        idat += comp.compress(b"\0" + line[(y % period) * channels : (y % period + side) * channels].tobytes())
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra_chunks + _chunk(b"IDAT", bytes(idat))
                     + _chunk(b"IEND", b""))
    return path


def nasty_set(folder: Path, side: int = SIDE) -> list[Path]:
    palette = bytes(np.random.default_rng(0).integers(0, 256, 256 * 3, dtype=np.uint8))
    trns = bytes([0, 128] + [255] * 254)  # index 0 transparent, 1 half: the palette path composites on white
    return [
        write_png(folder / "palette.png", side, colour_type=3, channels=1,
                  extra_chunks=_chunk(b"PLTE", palette) + _chunk(b"tRNS", trns)),
        write_png(folder / "grey_alpha.png", side, colour_type=4, channels=2),
    ]


# Measures one decode in a fresh interpreter: RSS before (imports done, bytes read) and the peak after.
PROBE = """
import json, resource, sys
from pipeline.decode import decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r = decode_image(data, max_side=int(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"status": r.status, "size": list(r.image.size) if r.image else None, "before": before, "peak": peak}))
"""


def measure(path: Path, *, max_side: int = 4096, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(REPO)}
    # cwd outside any checkout: `python -c` puts the cwd first on sys.path, before PYTHONPATH
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(max_side)], capture_output=True, text=True,
                         env=env, cwd=path.parent, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def nasty(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return nasty_set(tmp_path_factory.mktemp("nasty"))


def test_nasty_pngs_are_small_files_under_the_pixel_cap(nasty: list[Path]) -> None:
    for path in nasty:
        assert path.stat().st_size < 10_000_000
        assert struct.unpack(">II", path.read_bytes()[16:24]) == (SIDE, SIDE)  # IHDR width, height
    assert SIDE * SIDE <= default_max_pixels()  # decoded (not refused): the bound must hold for what is decoded


@pytest.mark.parametrize("name,source_bytes_per_px", [("palette.png", 1), ("grey_alpha.png", 4)])
def test_peak_rss_of_a_nasty_decode_stays_under_the_bound(nasty: list[Path], name: str, source_bytes_per_px: int) -> None:
    path = next(p for p in nasty if p.name == name)
    got = measure(path)
    assert got["status"] == "ok" and max(got["size"]) == 4096
    grown = got["peak"] - got["before"]
    # The documented bound (README): 4 bytes × max_pixels + the output + band work space.
    assert grown <= memory_bound_bytes(max_side=4096), (name, grown)
    # And what this image needs: its decoded source (Pillow's bytes per pixel for the mode) + output + band work,
    # with 25% slack for allocator behaviour; the old full-size conversion took 2.7 GB / 3.2 GB here.
    expected = source_bytes_per_px * SIDE * SIDE + 2 * 4 * 4096 * 4096 + BAND_WORK_BYTES
    assert grown <= 1.25 * expected, (name, grown, expected)


def _la_png(w: int, h: int) -> tuple[Image.Image, bytes]:
    import io

    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"), buf.getvalue()


def test_banded_resize_equals_whole_image_resize() -> None:
    """The banded path is not an approximation: the pixels of converting the whole image, then resizing."""
    whole, data = _la_png(1900, 2300)  # 4.4M pixels > BAND_PIXELS: converted in bands
    got = decode_image(data, max_side=475)
    want = whole.resize(got.image.size, Image.Resampling.BICUBIC)
    assert got.image.size == (392, 475)
    diff = np.abs(np.asarray(got.image, dtype=int) - np.asarray(want, dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding of band offsets, nothing more


def test_banded_reduce_for_a_cover_equals_whole_image_reduce() -> None:
    whole, data = _la_png(1900, 2300)
    got = decode_image(data, cover=224)  # needs 224 on the short side: box-reduced by 4, staying >= 2 × 224
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(whole.reduce(4)))


# The pixels embedder's PCA fit, in a fresh interpreter: peak RSS growth while fitting on a folder.
FIT_PROBE = """
import json, resource, sys, types
from pipeline.embed import PixelsEmbedder
from pipeline.fill_store import _sample_images
from pipeline.sources import ImageFolderSource
source = ImageFolderSource(sys.argv[1])
plan = types.SimpleNamespace(source=source, refs=source.refs())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
emb = PixelsEmbedder(size=16, dim=8, fit_samples=100).fit(_sample_images(plan, 100, seed=0, max_side=4096, max_pixels=None))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"n_fit": emb.n_fit, "grown": peak - before}))
"""


def test_pixels_fit_memory_does_not_grow_with_image_size(tmp_path: Path) -> None:
    """#18: the fit sample used to hold every decoded image (40 photos of 4000x3000: +1.4 GB); now one at a time."""
    rng = np.random.default_rng(0)
    grown = {}
    for label, (w, h) in {"small": (64, 48), "large": (2400, 1800)}.items():
        folder = tmp_path / label
        folder.mkdir()
        tile = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
        for i in range(24):
            tile.rotate(i * 15).save(folder / f"{i:02d}.jpg", quality=85)
        out = subprocess.run([sys.executable, "-c", FIT_PROBE, str(folder)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=300, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["n_fit"] == 24
        grown[label] = got["grown"]
    held_if_kept = 24 * 2400 * 1800 * 4  # 415 MB: what keeping the decoded images would take
    assert grown["large"] - grown["small"] < 0.25 * held_if_kept, grown
