"""What the embedders share: the `Embedder` protocol and small helpers for their `describe()` and outputs."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


@runtime_checkable
class Embedder(Protocol):
    """What embed_refs needs from an embedder.

    `preprocess` runs in DataLoader worker processes, so it must be picklable on its own (an attribute holding a
    transform object, not a bound method dragging the model along). `encode` returns float32 rows of unit L2 norm.
    `describe` is JSON-serialisable and stable across runs with the same settings: the store compares it on resume.
    """

    name: str
    dim: int

    def preprocess(self, img: Image.Image) -> torch.Tensor: ...

    def encode(self, batch: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...



def versions() -> dict[str, str]:
    import PIL

    out = {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return out


def jsonable(value: Any) -> Any:
    """Tuples → lists, numpy scalars → Python, so describe() equals its own JSON round trip (store.json compares them)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

