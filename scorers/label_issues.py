"""Label issues by confident learning (Northcutt, Jiang & Chuang, JAIR 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels"), through the cleanlab library itself (cleanlab/cleanlab, ``find_label_issues`` and
``get_label_quality_scores``); nothing of confident learning is re-implemented here.

Method: out-of-fold predicted probabilities come from the same cross-fitted proxy heads EL2N and AUM use
(:func:`scorers.el2n.el2n_embedding_scores` with ``return_probs=True``: stratified folds, a head never scores a row it
trained on, averaged over seeds); cleanlab estimates the joint of given and true labels from them and flags the rows
it counts as off-diagonal. The suggested label is the class with the highest out-of-fold probability.

Orientation: ``label_quality`` (cleanlab's self-confidence by default, the out-of-fold probability of the given label):
**higher = label more likely right** = more worth keeping. ``is_issue`` marks the rows cleanlab flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Sequence

import numpy as np

from pydantic import Field

from scorers.step import Count, Score, ScoringContext, StepOutput, alive_rows, scatter, step

__all__ = ["LabelIssueResult", "label_issues_from_probs", "label_issues_from_embeddings"]

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


@dataclass(frozen=True)
class LabelIssueResult:
    is_issue: np.ndarray  # bool [n]
    label_quality: np.ndarray  # float32 [n], higher = label more likely right
    suggested: np.ndarray  # int64 [n], argmax class index of the out-of-fold probabilities
    classes: np.ndarray  # class names/values: classes[code]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def suggested_label(self) -> np.ndarray:
        return self.classes[self.suggested]


def label_issues_from_probs(
    codes: np.ndarray, pred_probs: np.ndarray, *, filter_by: str = "prune_by_noise_rate", quality_method: str = "self_confidence",
    classes: np.ndarray | None = None,
) -> LabelIssueResult:
    """cleanlab's ``find_label_issues`` and ``get_label_quality_scores`` on given integer labels and out-of-fold probabilities.

    ``codes``: int labels in [0, C); ``pred_probs``: n × C rows summing to 1 (out-of-fold, or cleanlab's estimates are
    biased towards the given labels). ``filter_by`` is cleanlab's (default its default, prune_by_noise_rate).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {FILTERS}, got {filter_by!r}")
    probs = np.asarray(pred_probs, dtype=np.float32)
    codes = np.asarray(codes, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != codes.shape[0]:
        raise ValueError(f"pred_probs must be n × classes aligned with labels, got {probs.shape} for {codes.shape[0]} labels")
    probs = probs / probs.sum(axis=1, keepdims=True)
    issues = find_label_issues(labels=codes, pred_probs=probs, filter_by=filter_by)
    quality = get_label_quality_scores(labels=codes, pred_probs=probs, method=quality_method)
    classes = np.arange(probs.shape[1]) if classes is None else np.asarray(classes)
    info = {"method": "confident learning (cleanlab.filter.find_label_issues)", "filter_by": filter_by,
            "quality_method": quality_method, "issues": int(issues.sum()),
            "oof_accuracy": float((probs.argmax(1) == codes).mean()) if len(codes) else None}
    return LabelIssueResult(is_issue=np.asarray(issues, dtype=bool), label_quality=np.asarray(quality, dtype=np.float32),
                            suggested=probs.argmax(1).astype(np.int64), classes=classes, info=info)


def label_issues_from_embeddings(
    emb: Any,
    labels: np.ndarray | Sequence[Any],
    *,
    head: str = "linear",
    n_seeds: int = 3,
    n_folds: int = 5,
    epochs: int = 10,
    filter_by: str = "prune_by_noise_rate",
    device: str = "cpu",
    seed: int = 0,
) -> LabelIssueResult:
    """Label issues of every row from out-of-fold proxy heads on the embeddings (the EL2N/AUM training loop) and cleanlab.

    Knobs as :func:`scorers.el2n.el2n_embedding_scores` (the probabilities are taken after the last epoch).
    Returns :class:`LabelIssueResult`; ``suggested_label`` gives the suggested labels in the input's label values.
    """
    from scorers.el2n import el2n_embedding_scores

    fit = el2n_embedding_scores(emb, labels, head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs, score_epoch=epochs,
                                return_probs=True, device=device, seed=seed)
    assert fit.probs is not None and fit.classes is not None
    classes = fit.classes
    codes = np.searchsorted(classes, np.asarray(labels))
    result = label_issues_from_probs(codes, fit.probs, filter_by=filter_by, classes=classes)
    result.info.update(proxy={k: fit.info[k] for k in ("head", "n_seeds", "n_folds", "epochs", "lr", "seconds")})
    return result

# ---- the curate step --------------------------------------------------------------------------------------------------

@step("label_issues", reason="label_issue", needs=("labels",),
      scores=(Score("score_label_quality", higher="label more likely right"),),
      orientation="score_label_quality: cleanlab self-confidence (out of fold); low = label likely wrong")
def step_label_issues(
    ctx: ScoringContext,
    *,
    filter_by: str = "prune_by_noise_rate",
    head: Literal["linear", "mlp"] = "linear",
    n_seeds: Count = 3,
    n_folds: Annotated[int, Field(ge=2)] = 5,
    epochs: Count = 10,
    seed: int | None = None,
) -> StepOutput:
    """Label issues by confident learning (cleanlab.filter.find_label_issues) on out-of-fold probabilities of the
    EL2N/AUM proxy heads (label_issues_from_embeddings above). Drops flagged rows (reason label_issue); `suggested_label`
    is the heads' class for them. score_label_quality: cleanlab self-confidence, higher = label more likely right.
    """
    rows, emb = alive_rows(ctx)
    result = label_issues_from_embeddings(emb, ctx.labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs,
                                          filter_by=filter_by, device=ctx.device, seed=ctx.seed if seed is None else seed)
    n = len(ctx.alive)
    drop = np.zeros(n, dtype=bool)
    drop[rows[result.is_issue]] = True
    suggested = np.full(n, None, dtype=object)
    suggested[rows[result.is_issue]] = result.suggested_label[result.is_issue]
    return StepOutput(scores={"score_label_quality": scatter(n, rows, result.label_quality)}, drop=drop,
                      text={"suggested_label": suggested}, info=result.info)
