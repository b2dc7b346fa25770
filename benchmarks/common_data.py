"""Real benchmark data as uint8 arrays: CIFAR-10 (decoded once from the shared JPEG bytes) and Fashion-MNIST.

CIFAR-10 ships as the JPEG bytes of a quality-75 re-encoding (``../shared/data/cifar10_jpeg_bytes.npz``);
decoding 60k JPEGs with Pillow takes ~10-20 s on 2 cores, so the pixels are cached as ``.npy`` under
``benchmarks/.cache`` (git-ignored) and memory-mapped on later runs. The cache file name carries the
Pillow version because other libjpeg builds may differ by ±1 on a few pixels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = ["DATA_DIR", "CACHE_DIR", "load_cifar10", "load_fmnist", "load_dataset"]

DATA_DIR = Path(os.environ.get("WINNOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE_DIR = Path(os.environ.get("WINNOW_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


def _decode_split(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    n = offsets.shape[0] - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    raw = blob.tobytes()
    for i in range(n):
        with Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape != (32, 32, 3):
            raise ValueError(f"CIFAR image {i} decoded to shape {arr.shape}, expected (32, 32, 3)")
        out[i] = arr
    return out


def load_cifar10(data_dir: Path = DATA_DIR, cache_dir: Path = CACHE_DIR) -> dict[str, np.ndarray]:
    """CIFAR-10 as ``x_train [50000,32,32,3] uint8, y_train int64, x_test [10000,32,32,3], y_test``."""
    import PIL

    src = Path(data_dir) / "cifar10_jpeg_bytes.npz"
    if not src.exists():
        raise FileNotFoundError(f"{src} not found (set WINNOW_SHARED_DATA to the shared data folder)")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f"cifar10_pil{PIL.__version__}"
    out: dict[str, np.ndarray] = {}
    with np.load(src) as z:
        for split in ("train", "test"):
            path = cache_dir / f"{tag}_{split}.npy"
            if not path.exists():
                pixels = _decode_split(z[f"jpeg_{split}"], z[f"offsets_{split}"])
                tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
                np.save(tmp, pixels)
                os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
            out[f"x_{split}"] = np.load(path, mmap_mode="r")
            out[f"y_{split}"] = np.asarray(z[f"y_{split}"], dtype=np.int64)
    return out


def load_fmnist(data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    """Fashion-MNIST as ``x_train [60000,28,28] uint8, y_train int64, x_test [10000,28,28], y_test``."""
    src = Path(data_dir) / "fashion_mnist.npz"
    if not src.exists():
        raise FileNotFoundError(f"{src} not found (set WINNOW_SHARED_DATA to the shared data folder)")
    with np.load(src) as z:
        return {k: (np.asarray(z[k], dtype=np.int64) if k.startswith("y_") else np.asarray(z[k]))
                for k in ("x_train", "y_train", "x_test", "y_test")}


def load_dataset(name: str) -> dict[str, np.ndarray]:
    """``"cifar10"`` or ``"fmnist"``."""
    if name == "cifar10":
        return load_cifar10()
    if name == "fmnist":
        return load_fmnist()
    raise ValueError(f"unknown dataset {name!r}; expected 'cifar10' or 'fmnist'")
