"""Random scores: the baseline every pruning method must beat."""
from __future__ import annotations

import numpy as np


def random_scores(n: int, *, seed: int = 0) -> np.ndarray:
    """Uniform scores in [0, 1), reproducible from `seed`.

    Method: none — a seeded draw, so that keeping the top-k is a uniform random subset.
    Orientation: meaningless by design; higher is kept first so selections are comparable with other scorers.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).random(n, dtype=np.float64).astype(np.float32)
