"""CLIP score and label–image agreement from the image and text towers of one CLIP model.

- :func:`clip_scores`: cosine similarity between a row's image embedding and its caption's text embedding (Hessel et
  al., EMNLP 2021, "CLIPScore", without the 2.5 rescaling; the filter of Schuhmann et al. 2021, LAION-400M, threshold
  0.28 with ViT-B/32, and Gadre et al. 2023, DataComp, whose strongest simple baseline keeps the top 30% by it).
  Orientation: **higher = caption and image agree more** = more worth keeping. NaN where a row has no caption.
- :func:`label_agreement`: zero-shot classification with "a photo of a {label}" prompts (Radford et al. 2021, CLIP);
  a row whose own label is not among the top_k classes is a label–image mismatch. ``rank`` orientation: lower = the
  label agrees more (0 = the top class).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from scorers.arrays import encode_labels
from scorers.step import Between, Count, Fraction, Score, ScoringContext, StepOutput, alive_rows, drop_by_score, scatter, step

__all__ = ["clip_scores", "label_agreement", "AgreementResult", "PROMPT"]

PROMPT = "a photo of a {label}."
_ROWS = 16_384


def clip_scores(image_emb: Any, text_emb: np.ndarray, *, has_text: np.ndarray | None = None) -> np.ndarray:
    """Row-wise cosine similarity of unit image and text embeddings (n × d each); NaN where ``has_text`` is False."""
    n = image_emb.shape[0]
    if text_emb.shape != (n, image_emb.shape[1]):
        raise ValueError(f"text embeddings {text_emb.shape} do not align with image embeddings {image_emb.shape}")
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _ROWS):
        a = np.asarray(image_emb[start:start + _ROWS], dtype=np.float32)
        b = np.asarray(text_emb[start:start + _ROWS], dtype=np.float32)
        out[start:start + len(a)] = np.einsum("ij,ij->i", a, b)
    if has_text is not None:
        out[~np.asarray(has_text, dtype=bool)] = np.nan
    return out


@dataclass(frozen=True)
class AgreementResult:
    rank: np.ndarray  # int64 [n]: how many classes score above the row's own label (0 = own label on top)
    own_score: np.ndarray  # float32 [n]: similarity to the own label's prompt
    predicted: np.ndarray  # int64 [n]: the zero-shot class
    mismatch: np.ndarray  # bool [n]: own label not in the top_k


def label_agreement(image_emb: Any, class_text_emb: np.ndarray, codes: np.ndarray, *, top_k: int = 1) -> AgreementResult:
    """Zero-shot agreement of each row's label: ``class_text_emb`` is C × d (one unit prompt embedding per class,
    in code order), ``codes`` the rows' labels as ints in [0, C). Ties count in the row's favour."""
    codes = np.asarray(codes, dtype=np.int64)
    c = class_text_emb.shape[0]
    if not 1 <= top_k <= c:
        raise ValueError(f"top_k must be in [1, {c}] (the number of classes), got {top_k}")
    n = image_emb.shape[0]
    rank = np.empty(n, dtype=np.int64)
    own = np.empty(n, dtype=np.float32)
    pred = np.empty(n, dtype=np.int64)
    t = np.asarray(class_text_emb, dtype=np.float32)
    for start in range(0, n, _ROWS):
        sims = np.asarray(image_emb[start:start + _ROWS], dtype=np.float32) @ t.T
        y = codes[start:start + len(sims)]
        o = sims[np.arange(len(sims)), y]
        own[start:start + len(sims)] = o
        rank[start:start + len(sims)] = (sims > o[:, None]).sum(axis=1)
        pred[start:start + len(sims)] = sims.argmax(axis=1)
    return AgreementResult(rank=rank, own_score=own, predicted=pred, mismatch=rank >= top_k)

# ---- the curate step --------------------------------------------------------------------------------------------------

@step("clip_score", reason="clip_score", needs=("captions",), exactly_one=(("keep_fraction", "threshold", "quantile"),),
      scores=(Score("score_clip", higher="caption and image agree more"),),
      orientation="score_clip: cosine(image, caption) in the same CLIP model; higher = agree more")
def step_clip_score(
    ctx: ScoringContext,
    *,
    keep_fraction: Fraction | None = None,
    threshold: float | None = None,
    quantile: Between(0, 1) | None = None,
    batch_size: Count = 256,
    text_embeddings: Literal["auto", "source", "compute"] = "auto",
) -> StepOutput:
    """CLIP score: cosine of each row's image embedding and its caption's text embedding from the same open_clip model
    (clip_scores above). Keeps the top keep_fraction (DataComp's CLIP-score filter keeps 30%) or the rows at or
    above threshold (LAION-400M used 0.28 with ViT-B/32) or above the quantile. Rows without a caption: NaN, kept.
    `text_embeddings`: "source" = the caption embeddings the source ships (precomputed text_emb_paths: LAION
    text_emb/*.npy or DataComp .npz b32_txt / l14_txt; a table's text_embedding_column; matched by uid), "compute" = the captions embedded with the run's text tower, "auto" = the source's when it has them.
    """
    shipped = ctx.source_text() if text_embeddings != "compute" and ctx.source_text is not None else None
    if text_embeddings == "source" and shipped is None:
        raise ValueError("clip_score text_embeddings: source needs a source that ships caption embeddings: a precomputed "
                         "source's text_emb_paths (LAION text_emb/*.npy, DataComp .npz) or a table's text_embedding_column")
    if shipped is not None:
        if shipped.shape != ctx.emb.shape:
            raise ValueError(f"the source's text embeddings {shipped.shape} do not match the image embeddings {ctx.emb.shape}")
        has = np.linalg.norm(shipped, axis=1) > 0  # zero rows: no caption embedding shipped
        score = clip_scores(ctx.emb, shipped, has_text=has)
        info: dict[str, Any] = {"text_embeddings": "source", "captions": int(has.sum())}
    else:
        captions = np.asarray(ctx.captions if ctx.captions is not None else [None] * len(ctx.alive), dtype=object)
        has = np.array([c is not None and c != "" for c in captions], dtype=bool)
        if not has.any():
            raise ValueError("clip_score needs captions (webdataset .txt/.json, a table's caption_column) or a precomputed "
                             "source's text_emb_paths; this source has none")
        distinct, inverse = np.unique(captions[has].astype(str), return_inverse=True)
        text = ctx.encode_text(list(distinct), batch_size=batch_size)
        full = np.zeros((len(captions), text.shape[1]), dtype=np.float32)
        full[has] = text[inverse]
        score = clip_scores(ctx.emb, full, has_text=has)
        info = {"text_embeddings": "computed", "captions": int(has.sum()), "distinct_captions": len(distinct)}
    drop, note = drop_by_score(ctx, score, keep="high", keep_fraction=keep_fraction, threshold=threshold, quantile=quantile)
    return StepOutput(scores={"score_clip": score}, drop=drop, info={**info, **note})


@step("label_agreement", reason="label_mismatch", needs=("labels",),
      scores=(Score("score_label_rank", higher="more classes score above the own label (0 = own label on top)"),),
      orientation="score_label_rank: classes whose prompt scores above the own label's (0 = own label on top); dropped when ≥ top_k")
def step_label_agreement(ctx: ScoringContext, *, top_k: Count = 1, prompt: str = "a photo of a {label}.") -> StepOutput:
    """Label–image agreement: zero-shot scores of `prompt` for every class with the run's CLIP text tower; drops rows
    whose own label is not in the top_k (reason label_mismatch). score_label_rank = how many classes score above the own
    label's prompt (0 = own label on top); `suggested_label` = the zero-shot class of dropped rows.
    """
    if "{label}" not in prompt:
        raise ValueError(f"prompt must contain {{label}}, got {prompt!r}")
    rows, emb = alive_rows(ctx)
    labels = ctx.labels[rows]
    codes, classes = encode_labels(labels.astype(str))
    text = ctx.encode_text([prompt.format(label=c.replace("_", " ")) for c in classes])
    result = label_agreement(emb, text, codes, top_k=top_k)
    n = len(ctx.alive)
    drop = np.zeros(n, dtype=bool)
    drop[rows[result.mismatch]] = True
    suggested = np.full(n, None, dtype=object)
    suggested[rows[result.mismatch]] = classes[result.predicted[result.mismatch]]
    return StepOutput(scores={"score_label_rank": scatter(n, rows, result.rank.astype(np.float32))}, drop=drop,
                      text={"suggested_label": suggested}, info={"top_k": top_k, "prompt": prompt, "classes": len(classes)})
