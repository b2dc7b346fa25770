"""Training-loop adapters: a torch Dataset over a manifest's kept rows, weighted sampling, weighted loss.

Weights: the manifest's `weight` (mean 1 over kept rows unless a reweighting scorer set them).
Use them one of two ways, not both:
- `weighted_sampler(ds)`: draw samples with probability ∝ weight, plain loss;
- `weighted_loss(per_sample_loss, w)`: uniform sampling, loss = Σ wᵢℓᵢ / Σ wᵢ over the batch.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from pipeline.decode import decode_image
from pipeline.manifest import read_manifest, read_run_info
from pipeline.sources import SampleRef, source_from_config


class ManifestDataset(Dataset):
    """The kept samples of a manifest as (image, label index, weight) triples.

    The images are read through the run's own source (rebuilt from run.json), so the same uid always
    means the same bytes. `classes` maps label indices back to label strings (sorted).
    """

    def __init__(self, run_dir: str | Path, *, transform: Callable[[Any], Any] | None = None, source: Any = None):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir).filter(pl.col("keep")).sort("uid")
        self.source = source if source is not None else source_from_config(read_run_info(run_dir)["config"]["source"])
        self.uids: list[str] = manifest["uid"].to_list()
        self.locations: list[str] = manifest["location"].to_list()
        labels = manifest["label"].to_list() if "label" in manifest.columns else [None] * manifest.height
        self.classes: list[str] = sorted({lab for lab in labels if lab is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)
        self.weights = manifest["weight"].to_numpy().astype(np.float32)
        self._labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int) -> tuple[Any, int, float]:
        ref = SampleRef(uid=self.uids[i], location=self.locations[i], label=self._labels[i])
        result = decode_image(self.source.read_bytes(ref))
        if result.image is None:
            raise OSError(f"{self.uids[i]} ({self.locations[i]}) no longer decodes: {result.status}")
        image = self.transform(result.image) if self.transform is not None else result.image
        return image, int(self.targets[i]), float(self.weights[i])


def weighted_sampler(dataset: ManifestDataset, *, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Samples kept rows with probability ∝ weight, with replacement, len(dataset) draws per epoch by default."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.as_tensor(dataset.weights, dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples or len(dataset), replacement=True, generator=generator)


def weighted_loss(per_sample_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢℓᵢ / Σ wᵢ: the weighted mean, so the loss scale does not depend on the weights' scale."""
    weights = weights.to(per_sample_loss.dtype)
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights of a batch sum to zero")
    return (weights * per_sample_loss).sum() / total
