"""AUM: area under the margin (Pleiss et al., NeurIPS 2020, "Identifying Mislabeled Data using the
Area Under the Margin Ranking").

The margin of a sample at one epoch is its assigned-class logit minus the largest other logit; AUM is
the mean margin over the epochs of training. Samples whose label fights the rest of the data (mislabeled
or ambiguous) keep a low, often negative, margin.

Orientation: **low AUM = likely mislabeled / hard**, high AUM = easy. This is the opposite of the
package default (higher = more worth keeping when keeping hard); negate it (``-aum``) to feed it to a
selector that keeps the hardest, e.g. as the CCS cut score (Zheng et al. 2023 cut by AUM).

Two ways to get AUM here:
- :func:`aum_from_logits` from a logit history you recorded yourself (``[epochs, n, classes]``);
- :func:`aum_embedding_scores` from proxy heads on embeddings, reusing the EL2N training loop in
  :mod:`scorers.el2n` (out-of-fold margins; see that function), and ``el2n_model_scores`` in model mode
  (in-sample margins recorded during training, as Pleiss et al. do).
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field

from scorers.el2n import Head, el2n_embedding_scores, margins
from scorers.lazy import lazy_module
from scorers.step import Count, Fraction, Score, ScoringContext, StepOutput, scatter, select_among_alive, step

# Imported on first use, not when config validation imports this module (scorers/lazy.py).
torch = lazy_module("torch")

__all__ = ["aum_from_logits", "margins", "aum_embedding_scores"]


def aum_from_logits(logit_history: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Area under the margin from a recorded logit history (Pleiss et al. 2020).

    Args:
        logit_history: ``[epochs, n, classes]`` logits (pre-softmax), one slice per recorded epoch.
        labels: ``[n]`` assigned labels as ints in ``[0, classes)``.

    Returns:
        float32 ``[n]``: mean over epochs of (assigned logit − largest other logit).
        Orientation: **low = likely mislabeled / hard**.
    """
    hist = np.asarray(logit_history)
    if hist.ndim != 3:
        raise ValueError(f"logit_history must be [epochs, n, classes], got shape {hist.shape}")
    n_epochs, n, n_classes = hist.shape
    if n_epochs == 0:
        raise ValueError("logit_history has no epochs")
    if n_classes < 2:
        raise ValueError(f"logit_history needs at least 2 classes, got {n_classes}")
    if not np.all(np.isfinite(hist)):
        raise ValueError("logit_history contains NaN or inf")
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logit_history, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    t = torch.from_numpy(np.ascontiguousarray(hist, dtype=np.float64))
    yt = torch.from_numpy(y.astype(np.int64))
    total = torch.zeros(n, dtype=torch.float64)
    for e in range(n_epochs):
        total += margins(t[e], yt)
    return (total / n_epochs).numpy().astype(np.float32)


def aum_embedding_scores(emb: np.ndarray, labels: np.ndarray, **kwargs: Any) -> np.ndarray:
    """AUM of each row from proxy heads trained on embeddings (out-of-fold margins).

    Runs :func:`scorers.el2n.el2n_embedding_scores` with ``return_aum=True`` (same knobs, same training
    loop, so one run gives EL2N, GraNd and AUM; call that function directly to get all three).
    Margins are taken out-of-fold after every epoch and averaged over epochs and seeds.

    Returns float32 ``[n]``. Orientation: **low = likely mislabeled / hard**.
    """
    kwargs.pop("return_aum", None)
    result = el2n_embedding_scores(emb, labels, return_aum=True, **kwargs)
    assert result.aum is not None
    return result.aum


# ---- the curate step --------------------------------------------------------------------------------------------------


@step("aum", reason="aum", needs=("labels",),
      scores=(Score("score_aum", higher="more likely correctly labelled (low = likely mislabeled)", hardness=-1),),
      orientation="score_aum: area under the margin; low = likely mislabeled; keeps the highest")
def step_aum(
    ctx: ScoringContext,
    *,
    keep_fraction: Fraction | None = None,
    head: Head = "linear",
    n_seeds: Count = 5,
    n_folds: Annotated[int, Field(ge=2)] = 5,
    epochs: Count = 10,
    seed: int | None = None,
) -> StepOutput:
    """AUM, area under the margin (Pleiss et al. 2020), out of fold on the embeddings of the rows still alive.

    score_aum: mean over epochs of (assigned logit − largest other logit); LOW = likely mislabeled.
    With keep_fraction, keeps the highest-AUM rows (drops the likeliest label errors), class-balanced.
    """
    rows = np.flatnonzero(ctx.alive)
    aum = aum_embedding_scores(ctx.emb[rows], ctx.labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs,
                               device=ctx.device, seed=ctx.seed if seed is None else seed)
    out = StepOutput(scores={"score_aum": scatter(len(ctx.uids), rows, aum)})
    if keep_fraction is not None:
        out.drop, out.info = select_among_alive(ctx, out.scores["score_aum"], keep_fraction, rule="hard")
    return out
