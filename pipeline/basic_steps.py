"""Steps for the basic checks every curation tool has (#17): quality, outlier, leak, label_issues, head, clip_score,
label_agreement. Each wraps a pure function of scorers/ and reads what it needs through the ScoringContext
(`ctx.meta_columns` for per-row store meta such as quality statistics and captions, `ctx.eval_sets` for embedded
evaluation sources, `ctx.encode_text` for the run's CLIP text tower, `ctx.embedder` for the store's embedder identity).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.steps import ScoringContext, StepOutput, _scatter, budget_for, select_among_alive


def _alive(ctx: ScoringContext) -> tuple[np.ndarray, Any]:
    rows = np.flatnonzero(ctx.alive)
    if len(rows) == len(ctx.alive):
        return rows, ctx.emb
    return rows, (ctx.emb.subset(rows) if hasattr(ctx.emb, "subset") else ctx.emb[rows])


def _one_of(name: str, **given: Any) -> str:
    set_ = [k for k, v in given.items() if v is not None]
    if len(set_) != 1:
        raise ValueError(f"{name} needs exactly one of {', '.join(given)}" + (f" (got {', '.join(set_)})" if set_ else ""))
    return set_[0]


def _drop_by_score(ctx: ScoringContext, score: np.ndarray, *, keep: str, keep_fraction: float | None,
                   threshold: float | None, quantile: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Drops alive rows by a score: keep: high keeps the highest (drops low ones), keep: low the lowest.

    keep_fraction: a fraction of all scorable rows (not class-balanced: these checks are about the rows, not the
    classes); threshold: rows on the wrong side go; quantile: the threshold is that quantile of the alive rows'
    scores (keep: high drops below the q-quantile, keep: low drops above the (1 − q)-quantile). NaN scores are kept.
    """
    if keep not in ("high", "low"):
        raise ValueError(f"keep must be 'high' or 'low', got {keep!r}")
    signed = score if keep == "high" else -score
    alive = ctx.alive
    if keep_fraction is not None:
        ok = np.isfinite(signed)
        top = float(signed[ok].max()) + 1.0 if ok.any() else 0.0
        finite = np.where(ok, signed, top)  # unscored rows (no caption) are kept first
        drop, note = select_among_alive(ctx, finite, keep_fraction, rule="hard", class_balanced=False)
        return drop, note
    values = score[alive & np.isfinite(score)]
    if quantile is not None:
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        threshold = float(np.quantile(values, quantile if keep == "high" else 1 - quantile)) if len(values) else np.inf
    with np.errstate(invalid="ignore"):
        bad = (score < threshold) if keep == "high" else (score > threshold)
    return bad & alive, {"threshold": float(threshold), "keep": keep}


def step_quality(
    ctx: ScoringContext,
    *,
    min_side: Any = 32,
    max_aspect: Any = 4.0,
    min_blur: Any = 0.15,
    max_dark_fraction: Any = 0.9,
    max_bright_fraction: Any = 0.9,
    min_contrast: Any = 0.03,
    min_entropy: Any = 3.0,
    min_colourfulness: Any = None,
    min_bytes_per_pixel: Any = None,
) -> StepOutput:
    """Image-quality checks on the statistics measured while decoding for embedding (scorers/quality.py).

    Drops rows failing any check (reason low_quality) and names the failed checks in `quality_issue`. Each threshold is
    a number, {quantile: q} of the rows still alive, or null (check off). Scores: score_quality_blur, _brightness,
    _contrast, _entropy (measurements; higher blur/contrast/entropy = better).
    """
    from scorers.quality import STAT_COLUMNS, quality_issues

    meta = ctx.meta_columns(["width", "height", *STAT_COLUMNS])
    if all(np.isnan(np.asarray(meta[c], dtype=np.float64)).all() for c in STAT_COLUMNS):
        raise ValueError("quality needs the statistics measured while decoding; this store has none (precomputed "
                         "embeddings, or a store embedded before quality statistics existed: re-embed it)")
    rows = np.flatnonzero(ctx.alive)
    stats = {c: np.asarray(meta[c], dtype=np.float64)[rows] for c in ("width", "height", *STAT_COLUMNS)}
    result = quality_issues(stats, min_side=min_side, max_aspect=max_aspect, min_blur=min_blur,
                            max_dark_fraction=max_dark_fraction, max_bright_fraction=max_bright_fraction,
                            min_contrast=min_contrast, min_entropy=min_entropy, min_colourfulness=min_colourfulness,
                            min_bytes_per_pixel=min_bytes_per_pixel)
    n = len(ctx.alive)
    issue = np.full(n, None, dtype=object)
    issue[rows] = result.issue
    drop = np.zeros(n, dtype=bool)
    drop[rows] = np.array([i is not None for i in result.issue], dtype=bool)
    scores = {f"score_quality_{name}": np.asarray(meta[f"q_{name}"], dtype=np.float32)
              for name in ("blur", "brightness", "contrast", "entropy")}
    return StepOutput(scores=scores, drop=drop, text={"quality_issue": issue},
                      info={"thresholds": result.thresholds, "failed_by_check": {c: int(m.sum()) for c, m in result.failed.items()}})


def step_outlier(
    ctx: ScoringContext,
    *,
    k: int = 10,
    score: str = "kth_distance",
    keep_fraction: float | None = None,
    quantile: float | None = None,
    max_score: float | None = None,
) -> StepOutput:
    """Outliers by the distance to the k-th nearest neighbour and a local density ratio (scorers/outlier.py), among the
    rows still alive. `score` (kth_distance or density_ratio) decides; exactly one of keep_fraction (of all rows),
    quantile (drop the top q) or max_score. score_outlier = k-th NN cosine distance, score_outlier_density = the ratio;
    higher = more outlying.
    """
    from pipeline.index import KnnParams, build_knn_index
    from scorers.outlier import outlier_scores

    if score not in ("kth_distance", "density_ratio"):
        raise ValueError(f"outlier score must be kth_distance or density_ratio, got {score!r}")
    _one_of("outlier", keep_fraction=keep_fraction, quantile=quantile, max_score=max_score)
    rows, emb = _alive(ctx)
    index, index_info = build_knn_index(emb, KnnParams(seed=ctx.seed))  # exact below 200k rows, IVF above
    result = outlier_scores(emb, k=k, index=index)
    n = len(ctx.alive)
    kth, ratio = _scatter(n, rows, result.kth_distance), _scatter(n, rows, result.density_ratio)
    chosen = kth if score == "kth_distance" else ratio
    drop, note = _drop_by_score(ctx, chosen, keep="low", keep_fraction=keep_fraction, threshold=max_score, quantile=quantile)
    return StepOutput(scores={"score_outlier": kth, "score_outlier_density": ratio}, drop=drop,
                      info={"k": k, "score": score, "index": index_info, **note})


def step_leak(ctx: ScoringContext, *, eval_sources: list[dict[str, Any]], eps: float = 0.02) -> StepOutput:
    """Decontamination: drops every row within eps (cosine distance) of a row of any eval source, exact byte-hash copies
    first, then a FAISS range search (scorers/leak.py); dup_of = the eval row's uid. score_leak = best similarity to an
    eval row within eps (NaN elsewhere). run.json: leaked rows per eval source.
    """
    from scorers.leak import find_leaks

    sets = [ctx.eval_sets[ctx.eval_key(spec)] for spec in eval_sources]
    eval_emb = np.concatenate([s.emb for s in sets]) if sets else np.zeros((0, ctx.emb.shape[1]), np.float32)
    eval_uids = np.concatenate([s.uids for s in sets]).astype(object)
    eval_sha1 = np.concatenate([s.sha1 for s in sets]).astype(object)
    owner = np.concatenate([np.full(len(s.uids), i) for i, s in enumerate(sets)])
    rows, emb = _alive(ctx)
    sha1 = np.asarray(ctx.meta_columns(["sha1"])["sha1"], dtype=object)[rows]
    result = find_leaks(emb, eval_emb, eps=eps, train_hashes=sha1, eval_hashes=eval_sha1)
    n = len(ctx.alive)
    leaked = result.match >= 0
    drop = np.zeros(n, dtype=bool)
    drop[rows[leaked]] = True
    dup = np.full(n, None, dtype=object)
    dup[rows[leaked]] = eval_uids[result.match[leaked]]
    per_source = {f"{i}:{sets[i].name}": int((owner[result.match[leaked]] == i).sum()) for i in range(len(sets))}
    return StepOutput(scores={"score_leak": _scatter(n, rows, result.similarity)}, drop=drop, text={"dup_of": dup},
                      info={"eps": eps, "leaked_by_eval_source": per_source, "exact_hash_matches": int(result.exact.sum()),
                            "eval_rows": int(len(eval_emb))})


def step_label_issues(
    ctx: ScoringContext,
    *,
    filter_by: str = "prune_by_noise_rate",
    head: str = "linear",
    n_seeds: int = 3,
    n_folds: int = 5,
    epochs: int = 10,
    seed: int | None = None,
) -> StepOutput:
    """Label issues by confident learning (cleanlab.filter.find_label_issues) on out-of-fold probabilities of the
    EL2N/AUM proxy heads (scorers/label_issues.py). Drops flagged rows (reason label_issue); `suggested_label` is the
    heads' class for them. score_label_quality: cleanlab self-confidence, higher = label more likely right.
    """
    from scorers.label_issues import label_issues_from_embeddings

    if ctx.labels is None:
        raise ValueError("label_issues needs labels; the source has none (image_folder class subfolders, or a label column)")
    rows, emb = _alive(ctx)
    result = label_issues_from_embeddings(emb, ctx.labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs,
                                          filter_by=filter_by, device=ctx.device, seed=ctx.seed if seed is None else seed)
    n = len(ctx.alive)
    drop = np.zeros(n, dtype=bool)
    drop[rows[result.is_issue]] = True
    suggested = np.full(n, None, dtype=object)
    suggested[rows[result.is_issue]] = result.suggested_label[result.is_issue]
    return StepOutput(scores={"score_label_quality": _scatter(n, rows, result.label_quality)}, drop=drop,
                      text={"suggested_label": suggested}, info=result.info)


def step_head(
    ctx: ScoringContext,
    *,
    path: str,
    name: str,
    activation: str = "none",
    output: str = "raw",
    column: int = 0,
    expected_embedder: str | None = None,
    keep: str = "high",
    keep_fraction: float | None = None,
    threshold: float | None = None,
    quantile: float | None = None,
) -> StepOutput:
    """A linear/MLP head on the embeddings from a safetensors file (scorers/head.py), e.g. the LAION aesthetic predictor.

    The head's expected embedder (`expected_embedder`, else the file's metadata key `embedder`, as "model/pretrained")
    must match the store's; score_<name>; keep high (aesthetic) or low (an NSFW probability) by keep_fraction,
    threshold or quantile (or none of them: score only).
    """
    from safetensors.numpy import load_file
    from safetensors import safe_open

    from scorers.head import head_scores, layers_from_state_dict

    if not name.isidentifier():
        raise ValueError(f"head name must be a plain identifier (it names the column score_{name}), got {name!r}")
    with safe_open(path, framework="numpy") as fh:
        file_meta = fh.metadata() or {}
    expected = expected_embedder or file_meta.get("embedder")
    actual = ctx.embedder_name()
    if expected is None:
        raise ValueError(f"head {name}: say which embedder it was trained on (expected_embedder: model/pretrained, or "
                         f"'embedder' in the safetensors metadata); this store's is {actual}")
    if expected != actual:
        raise ValueError(f"head {name} expects embeddings of {expected}, this store holds {actual}")
    layers = layers_from_state_dict(load_file(path))
    score = head_scores(ctx.emb, layers, activation=activation, output=output, column=column)
    given = [v for v in (keep_fraction, threshold, quantile) if v is not None]
    if len(given) > 1:
        raise ValueError("head takes at most one of keep_fraction, threshold, quantile")
    out = StepOutput(scores={f"score_{name}": score}, info={"head": path, "embedder": expected,
                                                            "layers": [list(w.shape) for w, _ in layers]})
    if given:
        out.drop, note = _drop_by_score(ctx, score, keep=keep, keep_fraction=keep_fraction, threshold=threshold, quantile=quantile)
        out.info.update(note)
    return out


def step_clip_score(
    ctx: ScoringContext,
    *,
    keep_fraction: float | None = None,
    threshold: float | None = None,
    quantile: float | None = None,
    batch_size: int = 256,
) -> StepOutput:
    """CLIP score: cosine of each row's image embedding and its caption's text embedding from the same open_clip model
    (scorers/clip_score.py). Keeps the top keep_fraction (DataComp's CLIP-score filter keeps 30%) or the rows at or
    above threshold (LAION-400M used 0.28 with ViT-B/32) or above the quantile. Rows without a caption: NaN, kept.
    """
    from scorers.clip_score import clip_scores

    _one_of("clip_score", keep_fraction=keep_fraction, threshold=threshold, quantile=quantile)
    captions = np.asarray(ctx.meta_columns(["caption"])["caption"], dtype=object)
    has = np.array([c is not None and c != "" for c in captions], dtype=bool)
    if not has.any():
        raise ValueError("clip_score needs captions (webdataset .txt/.json, a table's caption_column); this source has none")
    distinct, inverse = np.unique(captions[has].astype(str), return_inverse=True)
    text = ctx.encode_text(list(distinct), batch_size=batch_size)
    full = np.zeros((len(captions), text.shape[1]), dtype=np.float32)
    full[has] = text[inverse]
    score = clip_scores(ctx.emb, full, has_text=has)
    drop, note = _drop_by_score(ctx, score, keep="high", keep_fraction=keep_fraction, threshold=threshold, quantile=quantile)
    return StepOutput(scores={"score_clip": score}, drop=drop,
                      info={"captions": int(has.sum()), "distinct_captions": len(distinct), **note})


def step_label_agreement(ctx: ScoringContext, *, top_k: int = 1, prompt: str = "a photo of a {label}.") -> StepOutput:
    """Label–image agreement: zero-shot scores of `prompt` for every class with the run's CLIP text tower; drops rows
    whose own label is not in the top_k (reason label_mismatch). score_label_agreement = similarity to the own label's
    prompt minus the best other class's (higher = agrees more); `suggested_label` = the zero-shot class of dropped rows.
    """
    from scorers.clip_score import label_agreement

    if ctx.labels is None:
        raise ValueError("label_agreement needs labels; the source has none")
    if "{label}" not in prompt:
        raise ValueError(f"prompt must contain {{label}}, got {prompt!r}")
    rows, emb = _alive(ctx)
    labels = ctx.labels[rows]
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    text = ctx.encode_text([prompt.format(label=c.replace("_", " ")) for c in classes])
    result = label_agreement(emb, text, codes, top_k=top_k)
    n = len(ctx.alive)
    drop = np.zeros(n, dtype=bool)
    drop[rows[result.mismatch]] = True
    suggested = np.full(n, None, dtype=object)
    suggested[rows[result.mismatch]] = classes[result.predicted[result.mismatch]]
    return StepOutput(scores={"score_label_rank": _scatter(n, rows, result.rank.astype(np.float32))}, drop=drop,
                      text={"suggested_label": suggested}, info={"top_k": top_k, "prompt": prompt, "classes": len(classes)})
