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

import contextlib
import hashlib
import io
import math
import struct
import threading
from collections.abc import Iterator, Sequence
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

# Integer box reduction keeps the result >= this multiple of the target before the final (bicubic) resize: the same
# trade Pillow's ``reducing_gap`` makes (2.0: the reduction is invisible after the resize, and cheap).
REDUCING_GAP = 2.0
# Mode conversion works on bands of about this many source pixels (a few 4-byte copies of a band: ~64 MB of work).
BAND_PIXELS = 4_000_000
BAND_WORK_BYTES = 4 * 4 * BAND_PIXELS
# Decodes of more pixels than this (64 MB at 4 bytes a pixel) run at most LARGE_DECODE_SLOTS at a time per process.
LARGE_DECODE_PIXELS = 16_000_000
LARGE_DECODE_SLOTS = 1
_LARGE_SLOTS = threading.BoundedSemaphore(LARGE_DECODE_SLOTS)


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


def memory_bound_bytes(*, max_pixels: int | None = None, max_side: int = 4096) -> int:
    """The documented peak memory of one ``decode_image`` call (beyond the bytes passed in).

    Pillow holds a decoded image in at most 4 bytes a pixel (RGB, RGBA, LA, I, F all use 4), and at most
    ``max_pixels`` pixels are decoded; the mode conversion then runs band by band (``BAND_PIXELS`` source pixels,
    a few copies of a band) into an output of at most ``max_side``² pixels (4 bytes each, twice while resizing).
    """
    pixels = default_max_pixels() if max_pixels is None else max_pixels
    if pixels is None:
        raise ValueError("no pixel budget: Image.MAX_IMAGE_PIXELS is None and no max_pixels was given")
    return 4 * pixels + 2 * 4 * max_side * max_side + BAND_WORK_BYTES


def decode_image(
    data: bytes,
    *,
    max_side: int = 4096,
    max_pixels: int | None = None,
    cover: int | None = None,
    formats: Sequence[str] = DECODE_FORMATS,
) -> DecodeResult:
    """Decodes ``data`` to an 8-bit RGB image whose longest side is at most ``max_side``.

    Never raises on bad bytes: failures come back as a status (see the module docstring).
    ``max_pixels`` bounds the pixels actually decoded (after JPEG draft scaling); None means
    ``default_max_pixels()``. ``cover``, when given, is the shortest side the caller will resize to (a model's
    input): the image is then decoded and reduced only as far as needed to keep its shortest side >= ``cover``
    (JPEG DCT scaling, then integer box reduction while the result stays >= ``REDUCING_GAP`` × the target);
    the caller does the final resize. Raises ValueError only for a bad ``max_side``/``max_pixels``/``cover``.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max_pixels is None:
        max_pixels = default_max_pixels()
    elif max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    if cover is not None and cover < 1:
        raise ValueError(f"cover must be >= 1 or None, got {cover}")
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
    scale = needed_scale(width, height, max_side=max_side, cover=cover)
    try:
        if scale < 1 and im.format in ("JPEG", "MPO"):
            # DCT-domain scaling (1/2, 1/4, 1/8) while decoding; draft keeps the result >= the requested size.
            im.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        elif scale < 1 and im.format == "JPEG2000":
            im.reduce = _j2k_levels(scale)  # resolution levels skipped while decoding (Pillow's documented knob)
        if max_pixels is not None and _decoded_pixels(im) > max_pixels:
            return DecodeResult(None, STATUS_TOO_LARGE, width, height)
        with _decode_slot(_decoded_pixels(im)):
            im.load()
            orientation = _orientation(im)
            rgb = _shrink_to_rgb(im, scale * width / im.size[0] if im.size[0] else 1.0, max_side=max_side,
                                 exact=cover is None)
    except (Image.DecompressionBombError, MemoryError):
        return DecodeResult(None, STATUS_TOO_LARGE, width, height)
    except _ConversionError:  # an exotic mode Pillow cannot convert: the pixels are unusable to us
        return DecodeResult(None, STATUS_CORRUPT, width, height)
    except Exception:
        return DecodeResult(None, STATUS_CORRUPT, width, height)

    if orientation in (5, 6, 7, 8):  # these orientations swap the displayed axes
        width, height = height, width
    try:
        if max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
        if orientation in _ORIENTATION_FIX:
            rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
        elif rgb is im:  # detach from the lazily-loaded file object (and the caller's bytes it references)
            rgb = rgb.copy()
    except MemoryError:
        return DecodeResult(None, STATUS_TOO_LARGE, width, height)
    except Exception:
        return DecodeResult(None, STATUS_CORRUPT, width, height)
    return DecodeResult(rgb, STATUS_OK, width, height)


@dataclass(frozen=True)
class JpegHeader:
    """What ``peek_jpeg`` reads from a JPEG's header without decoding it."""

    width: int  # as stored (before EXIF orientation)
    height: int
    orientation: int  # EXIF orientation, 1 when absent or unreadable


def peek_jpeg(data: bytes, *, max_pixels: int | None = None) -> JpegHeader | None:
    """The header of a JPEG that a GPU decoder (nvJPEG) can take as it is, else None (decode it with decode_image).

    Taken: baseline or progressive JPEG in RGB (YCbCr) or greyscale, at most ``max_pixels`` (None: the default
    budget). Not taken: other formats, CMYK/YCCK (Adobe inversion is Pillow's), broken headers, oversized images.
    Reads markers only (no pixel decoding).
    """
    if len(data) < 3 or data[:3] != b"\xff\xd8\xff":
        return None
    budget = default_max_pixels() if max_pixels is None else max_pixels
    try:
        im = _identify(io.BytesIO(data), ("JPEG",))
    except Exception:
        return None
    if im is None or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    w, h = im.size
    if w < 1 or h < 1 or (budget is not None and w * h > budget):
        return None
    return JpegHeader(w, h, _orientation(im))


def needed_scale(width: int, height: int, *, max_side: int, cover: int | None) -> float:
    """The fraction of the full resolution a caller needs: enough for ``max_side`` and, with ``cover``, no more than
    keeps the shortest side >= ``cover``. 1.0 when the full resolution is needed."""
    if width < 1 or height < 1:
        return 1.0
    scale = min(1.0, max_side / max(width, height))
    if cover is not None:
        scale = min(scale, cover / min(width, height))
    return scale


def _decoded_pixels(im: Image.Image) -> int:
    """Pixels ``im.load()`` will produce (a JPEG 2000 ``reduce`` takes effect only at load)."""
    w, h = im.size
    levels = getattr(im, "_reduce", 0) if im.format == "JPEG2000" else 0
    if levels:
        power = 1 << levels
        w, h = -(-w // power), -(-h // power)
    return w * h


def _j2k_levels(scale: float) -> int:
    """Resolution levels a JPEG 2000 decode may skip (each halves both sides) and stay >= ``scale``."""
    levels = 0
    while 0.5 ** (levels + 1) >= scale and levels < 5:
        levels += 1
    return levels


@contextlib.contextmanager
def _decode_slot(pixels: int) -> Iterator[None]:
    """Large decodes take one of ``LARGE_DECODE_SLOTS`` per process (threads such as the report's wait their turn),
    so N threads never hold N large images at once; small decodes run freely."""
    if pixels <= LARGE_DECODE_PIXELS:
        yield
        return
    with _LARGE_SLOTS:
        yield


class _ConversionError(Exception):
    pass


def _shrink_to_rgb(im: Image.Image, scale: float, *, max_side: int, exact: bool) -> Image.Image:
    """The loaded ``im`` as 8-bit RGB at about ``scale`` of its size (at most ``max_side``).

    ``exact``: resized (bicubic) to the size ``thumbnail((max_side, max_side))`` gives. Otherwise (a caller that
    resizes again, e.g. to a model's input): only box-reduced by the integer factor that keeps it >= ``REDUCING_GAP``
    × the target, as Pillow's ``reducing_gap`` does. Images over ``BAND_PIXELS`` are converted band by band, so a
    13000² palette or grey+alpha image never exists as a full-size RGBA/RGB copy: memory is the decoded source, one
    band's conversion and the output. The bands give the same pixels as converting the whole image first.
    """
    w, h = im.size
    extrema = _extrema(im)
    large = w * h > BAND_PIXELS
    if exact:
        if max(w, h) <= max_side:
            return _to_rgb(im, extrema)
        if not large:
            rgb = _to_rgb(im, extrema)
            rgb = rgb.copy() if rgb is im else rgb
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
            return rgb
        return _banded(im, extrema, size=_thumbnail_size(w, h, max_side))
    factor = max(1, int(1.0 / scale / REDUCING_GAP)) if scale < 1 else 1
    if factor == 1 and not large:
        return _to_rgb(im, extrema)
    return _banded(im, extrema, factor=factor)


def _banded(
    im: Image.Image, extrema: tuple[float, float] | None, *, size: tuple[int, int] | None = None, factor: int = 1
) -> Image.Image:
    """Converts ``im`` to RGB band by band, each band resized to ``size`` (bicubic, with the source rows its filter
    reaches) or box-reduced by ``factor`` (bands a multiple of it), and pasted into the output."""
    w, h = im.size
    out_w, out_h = size if size is not None else (-(-w // factor), -(-h // factor))
    rows_per_out = h / out_h
    margin = 0 if size is None else math.ceil(2 * max(1.0, rows_per_out)) + 2  # bicubic reaches 2 output rows out
    # Image.crop runs Pillow's bomb check on the band: stay under its warning size as well.
    band_pixels = min(BAND_PIXELS, Image.MAX_IMAGE_PIXELS or BAND_PIXELS)
    source_rows = max(1, band_pixels // w - 2 * margin - 2)
    out_rows = max(1, int(source_rows // max(1.0, rows_per_out)))
    out = Image.new("RGB", (out_w, out_h))
    for o0 in range(0, out_h, out_rows):
        o1 = min(out_h, o0 + out_rows)
        if size is None:
            band = _to_rgb(im.crop((0, o0 * factor, w, min(h, o1 * factor))), extrema)
            out.paste(band.reduce(factor) if factor > 1 else band, (0, o0))
            continue
        y0, y1 = o0 * rows_per_out, o1 * rows_per_out
        c0, c1 = max(0, math.floor(y0) - margin), min(h, math.ceil(y1) + margin)
        band = _to_rgb(im.crop((0, c0, w, c1)), extrema)
        out.paste(band.resize((out_w, o1 - o0), Image.Resampling.BICUBIC, box=(0, y0 - c0, w, y1 - c0)), (0, o0))
    return out


def _thumbnail_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """The size ``Image.thumbnail((max_side, max_side))`` picks for a w×h image (aspect kept, sides >= 1)."""
    aspect = w / h
    if aspect >= 1:
        y = max(1, min(math.floor(max_side / aspect), math.ceil(max_side / aspect),
                       key=lambda n: 0 if n == 0 else abs(aspect - max_side / n)))
        return max_side, y
    x = max(1, min(math.floor(max_side * aspect), math.ceil(max_side * aspect), key=lambda n: abs(aspect - n / max_side)))
    return x, max_side


def _extrema(im: Image.Image) -> tuple[float, float] | None:
    """Whole-image (min, max) for the modes stretched by value range (I, F), so every band maps values alike."""
    if im.mode in ("I", "F"):
        lo, hi = im.getextrema()
        return float(lo), float(hi)
    return None


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


def _to_rgb(im: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Converts any loaded Pillow mode to 8-bit RGB (see module docstring for the rules).

    ``extrema`` is the whole image's (min, max) when ``im`` is one band of it (modes I and F)."""
    mode = im.mode
    try:
        if mode == "RGB" and "transparency" not in im.info:
            return im
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode, extrema)).convert("RGB")
        if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and im.info.get("transparency") is not None):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")  # L, 1, P, CMYK (Adobe inversion handled by the JPEG plugin), YCbCr, LAB, HSV
    except MemoryError:
        raise
    except Exception as exc:
        raise _ConversionError(str(exc)) from exc


def _high_depth_to_uint8(arr: np.ndarray, mode: str, extrema: tuple[float, float] | None = None) -> np.ndarray:
    if mode.startswith("I;16"):
        return _round_to_uint8(arr.astype(np.float32) / 257.0)
    values = arr.astype(np.float64)
    if extrema is not None:
        lo, hi = extrema
    else:
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
