"""The model-free pixels embedder: resized pixels → PCA → L2-normalised."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.embed.common import jsonable, l2_normalise, versions


class PixelTransform:
    """PIL image → flattened pixels in [0, 1] (float32), after an antialiased resize to size × size."""

    def __init__(self, size: int, grey: bool) -> None:
        self.size = size
        self.grey = grey

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("L" if self.grey else "RGB")
        small = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        arr = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
        return torch.from_numpy(arr)


class PixelsEmbedder:
    """Model-free baseline: resize → flatten pixels in [0, 1] → centre → PCA to `dim` → L2-normalise.

    `fit` learns the mean and the principal axes (exact SVD in float64, deterministic sign convention) from up to
    `fit_samples` images; when given more it keeps a uniform sample drawn with `seed`. `state`/`from_state` save and
    restore the fitted PCA so a resumed run embeds identically.
    """

    name = "pixels"

    def __init__(self, *, size: int = 16, grey: bool = False, dim: int = 64, fit_samples: int = 2000, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        n_pixels = size * size * (1 if grey else 3)
        if not 1 <= dim <= n_pixels:
            raise ValueError(f"dim {dim} must be between 1 and the pixel count {n_pixels} (size {size}, grey={grey})")
        if fit_samples < dim:
            raise ValueError(f"fit_samples {fit_samples} must be >= dim {dim}")
        self.size, self.grey, self.dim, self.fit_samples, self.seed = size, grey, dim, fit_samples, seed
        self.preprocess = PixelTransform(size, grey)
        self.device = torch.device("cpu")
        self._mean: np.ndarray | None = None
        self._components: np.ndarray | None = None
        self.n_fit = 0

    @property
    def is_fitted(self) -> bool:
        return self._components is not None

    def fit(self, images: Iterable[Image.Image]) -> PixelsEmbedder:
        rng = np.random.default_rng(self.seed)
        rows: list[np.ndarray] = []
        for seen, img in enumerate(images):
            vec = self.preprocess(img).numpy()
            if len(rows) < self.fit_samples:
                rows.append(vec)
            else:  # reservoir sampling: a uniform subset of everything seen
                j = int(rng.integers(0, seen + 1))
                if j < self.fit_samples:
                    rows[j] = vec
        if len(rows) < self.dim:
            raise ValueError(f"PCA to dim {self.dim} needs at least {self.dim} images to fit, got {len(rows)}")
        x = np.stack(rows).astype(np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[: self.dim]
        # SVD signs are arbitrary; fix them (largest-magnitude entry positive) so refits agree.
        pivots = comps[np.arange(self.dim), np.abs(comps).argmax(axis=1)]
        comps = comps * np.where(pivots < 0, -1.0, 1.0)[:, None]
        self._mean = mean.astype(np.float32)
        self._components = np.ascontiguousarray(comps, dtype=np.float32)
        self.n_fit = len(rows)
        return self

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if self._components is None or self._mean is None:
            raise RuntimeError("PixelsEmbedder is not fitted: call fit(images) or build it with from_state()")
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        x = x.reshape(len(x), -1).astype(np.float32, copy=False)
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"batch rows have {x.shape[1]} values, the fitted PCA expects {self._mean.shape[0]}")
        return l2_normalise((x - self._mean) @ self._components.T)

    def state(self) -> dict[str, np.ndarray]:
        if self._components is None or self._mean is None:
            raise RuntimeError("PixelsEmbedder is not fitted; nothing to save")
        return {
            "mean": self._mean.copy(),
            "components": self._components.copy(),
            "size": np.array(self.size),
            "grey": np.array(self.grey),
            "n_fit": np.array(self.n_fit),
            "seed": np.array(self.seed),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PixelsEmbedder:
        missing = {"mean", "components", "size", "grey"} - set(state)
        if missing:
            raise ValueError(f"pixels embedder state lacks {sorted(missing)}")
        comps = np.asarray(state["components"], dtype=np.float32)
        mean = np.asarray(state["mean"], dtype=np.float32)
        size, grey = int(state["size"]), bool(state["grey"])
        if comps.ndim != 2 or mean.shape != (comps.shape[1],) or comps.shape[1] != size * size * (1 if grey else 3):
            raise ValueError(f"inconsistent pixels state: components {comps.shape}, mean {mean.shape}, size {size}, grey {grey}")
        n_fit = int(state.get("n_fit", comps.shape[0]))
        emb = cls(size=size, grey=grey, dim=comps.shape[0], fit_samples=max(n_fit, comps.shape[0]),
                  seed=int(state.get("seed", 0)))
        emb._mean, emb._components, emb.n_fit = mean, np.ascontiguousarray(comps), n_fit
        return emb

    def describe(self) -> dict[str, Any]:
        if self._components is None or self._mean is None:
            raise RuntimeError("describe() needs a fitted PixelsEmbedder (its PCA is part of the result)")
        pca_hash = hashlib.sha256(self._mean.tobytes() + self._components.tobytes()).hexdigest()
        return jsonable(
            {
                "kind": "pixels",
                "model": "pixels",
                "dim": self.dim,
                "pca_sha256": pca_hash,
                "fit_samples": self.n_fit,
                "decode": "reference",  # full decode up to max_side: the pixels PCA sees the whole image
                "preprocessing": {
                    "size": self.size, "grey": self.grey, "resample": "bilinear", "scale": "[0, 1]", "centre": "fit mean",
                },
                "versions": versions(),
            }
        )

