"""Robust image decoding: bytes in, an 8-bit RGB ``PIL.Image`` (or a status saying why not) out.

``decode_image`` never raises on bad bytes; the caller records ``DecodeResult.status`` in the store's metadata.

Statuses
--------
``ok``         decoded and converted to 8-bit RGB, longest side <= ``max_side``.
``empty``      zero bytes.
``not_image``  no allowed Pillow format recognises the bytes.
``corrupt``    a format recognised the header but decoding failed (truncated files included: the global
               ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone and a half-decoded image is never returned).
``too_large``  even the cheapest decode Pillow offers (JPEG DCT scaling down to 1/8) would exceed the pixel budget.

Decisions
---------
* Decompression bombs: Pillow's ``Image.open`` refuses any header above ``2 * Image.MAX_IMAGE_PIXELS`` pixels,
  including legitimate 20000x10000 JPEGs that decode cheaply at 1/8 scale. We identify the bytes through Pillow's
  plugin registry ourselves (the same loop ``Image.open`` runs, minus its header check) and apply the budget to the
  pixels actually decoded *after* JPEG ``draft`` scaling. The process-wide ``MAX_IMAGE_PIXELS`` is never modified
  (it is only read, as the default budget), and no warnings filter is touched (``catch_warnings`` is not thread-safe).
* Only common raster formats are tried (``DECODE_FORMATS``): formats without a magic-number check (TGA, IM, ...)
  would "identify" random bytes, and EPS would launch Ghostscript on untrusted input.
* ``width``/``height`` are the full-resolution size as displayed, i.e. after EXIF orientation (for ``corrupt`` and
  ``too_large`` the header's size, orientation unknown).
* 16-bit greyscale is mapped to 8 bits by ``round(v / 257)`` (65535 -> 255), never clipped. 32-bit integer data
  outside 0..65535 and float data outside 0..1 are min-max stretched.
* Transparency (RGBA, LA, PA, palette or colour-key ``transparency``) is composited on white.
* An unreadable EXIF block does not fail the image: it is decoded unrotated.
"""
from __future__ import annotations

import hashlib
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Statuses a DecodeResult can carry.
STATUS_OK = "ok"
STATUS_EMPTY = "empty"
STATUS_NOT_IMAGE = "not_image"
STATUS_CORRUPT = "corrupt"
STATUS_TOO_LARGE = "too_large"
STATUSES = (STATUS_OK, STATUS_EMPTY, STATUS_NOT_IMAGE, STATUS_CORRUPT, STATUS_TOO_LARGE)

# Pillow format ids tried, in order. Each has a magic-number check (``accept``); MPO comes in through JPEG.
DECODE_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "AVIF", "JPEG2000", "QOI",
)

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (same table as PIL.ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of ``decode_image``: ``image`` is 8-bit RGB when ``status == "ok"``, else None.

    ``width``/``height`` describe the original image (full resolution), 0 when unknown.
    """

    image: Image.Image | None
    status: str
    width: int
    height: int

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


def sha1_hex(data: bytes) -> str:
    """Hex SHA-1 of the raw bytes (exact-duplicate detection, not security)."""
    return hashlib.sha1(data).hexdigest()


def default_max_pixels() -> int | None:
    """The pixel budget used when ``decode_image`` gets none: the size at which Pillow itself errors.

    Read at call time so a user who deliberately changes ``Image.MAX_IMAGE_PIXELS`` is respected.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def decode_image(
    data: bytes,
    *,
    max_side: int = 4096,
    max_pixels: int | None = None,
    formats: Sequence[str] = DECODE_FORMATS,
) -> DecodeResult:
    """Decodes ``data`` to an 8-bit RGB image whose longest side is at most ``max_side``.

    Never raises on bad bytes: failures come back as a status (see the module docstring).
    ``max_pixels`` bounds the pixels actually decoded (after JPEG draft scaling); None means
    ``default_max_pixels()``. Raises ValueError only for a bad ``max_side``/``max_pixels``.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max_pixels is None:
        max_pixels = default_max_pixels()
    elif max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    if len(data) == 0:
        return DecodeResult(None, STATUS_EMPTY, 0, 0)

    try:
        im = _identify(io.BytesIO(data), formats)
    except Image.DecompressionBombError:  # a plugin that checks sizes itself while opening (GIF, ICO)
        return DecodeResult(None, STATUS_TOO_LARGE, 0, 0)
    except MemoryError:
        return DecodeResult(None, STATUS_TOO_LARGE, 0, 0)
    except Exception:  # a format accepted the magic number, then the header turned out broken
        return DecodeResult(None, STATUS_CORRUPT, 0, 0)
    if im is None:
        return DecodeResult(None, STATUS_NOT_IMAGE, 0, 0)

    width, height = im.size
    try:
        if max(width, height) > max_side and im.format in ("JPEG", "MPO"):
            # DCT-domain scaling (1/2, 1/4, 1/8) while decoding; draft keeps the result >= the requested size.
            ratio = max_side / max(width, height)
            im.draft(None, (max(1, math.ceil(width * ratio)), max(1, math.ceil(height * ratio))))
        if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
            return DecodeResult(None, STATUS_TOO_LARGE, width, height)
        im.load()
    except (Image.DecompressionBombError, MemoryError):
        return DecodeResult(None, STATUS_TOO_LARGE, width, height)
    except Exception:
        return DecodeResult(None, STATUS_CORRUPT, width, height)

    orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):  # these orientations swap the displayed axes
        width, height = height, width
    try:
        rgb = _to_rgb(im)
        if max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        if orientation in _ORIENTATION_FIX:
            rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
        elif rgb is im:  # detach from the lazily-loaded file object (and the caller's bytes it references)
            rgb = rgb.copy()
    except MemoryError:
        return DecodeResult(None, STATUS_TOO_LARGE, width, height)
    except Exception:  # an exotic mode Pillow cannot convert: the pixels are unusable to us
        return DecodeResult(None, STATUS_CORRUPT, width, height)
    return DecodeResult(rgb, STATUS_OK, width, height)


def _identify(buf: io.BytesIO, formats: Sequence[str]) -> Image.Image | None:
    """``Image.open`` restricted to ``formats`` and without its header-size bomb check (see module docstring).

    Returns None when no format recognises the bytes; lets a recognised-but-broken header's error through.
    """
    Image.init()  # registers every plugin once; a no-op afterwards
    prefix = buf.read(16)
    for fmt in formats:
        entry = Image.OPEN.get(fmt.upper())
        if entry is None:
            continue
        factory, accept = entry
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):  # a str means "this format, but unsupported here"
            continue
        buf.seek(0)
        try:
            return factory(buf, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            # The same exceptions Image.open treats as "not this format"; try the next one.
            continue
    return None


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not lose an otherwise good image
        return 1
    return value if value in _ORIENTATION_FIX else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Converts any loaded Pillow mode to 8-bit RGB (see module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and im.info.get("transparency") is not None):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (Adobe inversion handled by the JPEG plugin), YCbCr, LAB, HSV


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return _round_to_uint8(arr.astype(np.float32) / 257.0)
    values = arr.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data in Pillow's 32-bit container (e.g. some PNG/TIFF)
        return _round_to_uint8(values / 257.0)
    if mode == "F" and lo >= 0 and hi <= 1:
        return _round_to_uint8(values * 255.0)
    if hi <= lo or not math.isfinite(hi - lo):
        return np.zeros(arr.shape, dtype=np.uint8)
    return _round_to_uint8((values - lo) * (255.0 / (hi - lo)))


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
