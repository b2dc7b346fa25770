"""Which decode path an embedder uses, and the GPU one: batched nvJPEG decode and resize on the device.

Decode paths (``embed.decode``; the resolved one is part of the store's embedder identity, so a store never mixes them):

``reference``  full decode (up to ``max_side``), then open_clip's own transform in the workers: open_clip's pixels.
``cpu``        JPEGs drafted in the DCT domain to the smallest scale that still covers the model's input, other
               formats box-reduced while >= 2× the input (Pillow's ``reducing_gap``), then the same transform. Cosine
               to ``reference`` measured in benchmarks/results/decode_paths.json.
``nvjpeg``     JPEG bytes go from the workers to the main process, are decoded in batches on the GPU
               (``torchvision.io.decode_jpeg(device="cuda")``) and resized there (bicubic, antialiased, as the CPU
               transform). Other formats, CMYK JPEGs and JPEGs nvJPEG refuses are decoded on the CPU (the ``cpu`` path).
``auto``       ``nvjpeg`` on CUDA when torchvision can decode there, else ``cpu``.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "nvjpeg", "reference")


@functools.cache
def nvjpeg_available(device_type: str = "cuda") -> bool:
    """True when torchvision decodes JPEGs on ``device_type`` (tried once on a tiny image)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import io

        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        decode_jpeg([data], device="cuda")
        return True
    except Exception as exc:  # a torchvision built without nvJPEG, a driver problem
        log.warning("nvJPEG decode unavailable (%s: %s); decoding on the CPU", type(exc).__name__, exc)
        return False


def choose_decode_path(requested: str, device: torch.device, *, resize_mode: str = "shortest") -> str:
    """Resolves ``embed.decode`` for an embedder on ``device`` whose transform resizes by ``resize_mode``.

    ``auto`` → ``nvjpeg`` on CUDA with nvJPEG and a 'shortest' resize (the geometry the GPU resize reproduces),
    else ``cpu``. An explicit ``nvjpeg`` that cannot run is an error, not a silent change of path.
    """
    if requested not in DECODE_CHOICES:
        raise ValueError(f"embed.decode {requested!r} is not one of {', '.join(DECODE_CHOICES)}")
    gpu_ok = device.type == "cuda" and nvjpeg_available(device.type)
    if requested == "auto":
        return "nvjpeg" if gpu_ok and resize_mode == "shortest" else "cpu"
    if requested == "nvjpeg":
        if device.type != "cuda":
            raise ValueError(f"embed.decode 'nvjpeg' needs a CUDA device, the embedder runs on {device.type}; use cpu or auto")
        if not gpu_ok:
            raise ValueError("embed.decode 'nvjpeg': torchvision cannot decode JPEGs on this GPU; use cpu or auto")
        if resize_mode != "shortest":
            raise ValueError(f"embed.decode 'nvjpeg' supports the 'shortest' resize only, this model uses {resize_mode!r}")
    return requested


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes (1-D uint8 CPU tensors) → (3, H, W) uint8 RGB tensors on ``device``; None where the decoder refuses.

    One batched call; if it fails (one bad image fails the batch), each image is retried alone.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except Exception:
        pass
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except Exception:
            out.append(None)
    return out


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Applies EXIF ``orientation`` (2..8) to a (C, H, W) tensor: the same transposes as pipeline.decode."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(1, 2)  # the main-diagonal transpose; the flips below finish each orientation
    flips = {2: [2], 3: [1, 2], 4: [1], 5: [], 6: [2], 7: [1, 2], 8: [1]}.get(orientation, [])
    return img.flip(flips) if flips else img


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 → (3, size, size) uint8: shortest side to ``size`` (bicubic, antialiased), centre crop.

    The geometry of open_clip's eval transform (torchvision Resize(size) + CenterCrop(size)), computed on the device.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = TF.resize(img.float().unsqueeze(0), [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    return x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
