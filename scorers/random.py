"""Random scores: the baseline every pruning method must beat."""
from __future__ import annotations

import numpy as np

from scorers.step import Fraction, Score, ScoringContext, StepOutput, select_among_alive, step


def random_scores(n: int, *, seed: int = 0) -> np.ndarray:
    """Uniform scores in [0, 1), reproducible from `seed`.

    Method: none — a seeded draw, so that keeping the top-k is a uniform random subset.
    Orientation: meaningless by design; higher is kept first so selections are comparable with other scorers.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).random(n, dtype=np.float64).astype(np.float32)


@step("random", reason="random", scores=(Score("score_random", higher="kept first (uniform, seeded)", nullable=False),),
      orientation="score_random: uniform, seeded; keeps a class-balanced random subset")
def step_random(ctx: ScoringContext, *, keep_fraction: Fraction = 1.0, seed: int | None = None) -> StepOutput:
    scores = random_scores(len(ctx.uids), seed=ctx.seed if seed is None else seed)
    out = StepOutput(scores={"score_random": scores})
    if keep_fraction < 1.0:
        out.drop, out.info = select_among_alive(ctx, scores, keep_fraction, rule="hard")
    return out
