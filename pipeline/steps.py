"""The scoring slot: how scorers from scorers/ plug into a curate run.

A run's `steps` are applied in order to the rows still kept. Each step gets a ScoringContext (all
embeddings, uids, labels, hashes, concept clusters, the mask of rows still alive) and returns a
StepOutput: score columns for the manifest, rows it drops (with its reason), optional dup_of, and
notes for run.json. Budgets (`keep_fraction`) are fractions of all scorable rows, so
"semdedup, then dbp keep_fraction 0.5" keeps half of the dataset, not half of what dedup left.

To add a scorer: write the pure function in scorers/, a step function here, and register it in STEPS.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fanout import FanOut
from pipeline.faults import failpoint
from pipeline.index import KMeansResult


@dataclass
class ScoringContext:
    emb: np.ndarray  # n × d unit rows (float16/32), or a lazy pipeline.rows.StoreRows over the store's shards
    uids: np.ndarray  # n str (object)
    labels: np.ndarray | None  # n str (object) or None when the source has no labels
    sha1: np.ndarray  # n str (object)
    kmeans: KMeansResult
    alive: np.ndarray  # n bool: rows no earlier step dropped
    n_scorable: int
    seed: int = 0
    device: str = "auto"
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # embedded target sets, by fill_store.target_key
    fan_out: FanOut | None = None  # runs per-cluster work as tasks on the run's task runner; None = in this process
    cluster_batches: int = 1  # how many batches of clusters fan_out gets
    cache_dir: Path | None = None  # for artefacts derived from this store's rows (rule: auto's evidence); None = no cache
    # Per-row store meta of the scored rows, in row order (quality statistics, captions, sha1): names → arrays.
    meta: Callable[[list[str]], dict[str, np.ndarray]] | None = None
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # embedded eval sources (leak), by eval_key
    text_encoder: Callable[..., np.ndarray] | None = None  # texts → unit embeddings from the run's CLIP text tower
    embedder: dict[str, Any] | None = None  # the store's embedder description (store.json)

    def meta_columns(self, names: list[str]) -> dict[str, np.ndarray]:
        if self.meta is None:
            raise ValueError(f"this run gives its steps no store meta (needed: {names})")
        return self.meta(names)

    def encode_text(self, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        if self.text_encoder is None:
            raise ValueError("this step needs the CLIP text tower: embed with embed.kind: clip")
        return self.text_encoder(texts, batch_size=batch_size)

    def embedder_name(self) -> str:
        """The store's embedder as "model/pretrained" (a checkpoint file's name when it has one; "pixels" for the pixels
        embedder)."""
        e = self.embedder or {}
        if e.get("kind") != "clip" or "model" not in e:
            return str(e.get("kind", "unknown"))  # pixels, precomputed
        weights = e.get("pretrained") or (Path(e["checkpoint"]).name if e.get("checkpoint") else "random")
        return f"{e['model']}/{weights}"

    @staticmethod
    def eval_key(spec: dict[str, Any]) -> str:
        import json

        return json.dumps(spec, sort_keys=True, default=str)


@dataclass(frozen=True)
class EvalSet:
    """One embedded eval source: its ok rows' embeddings, uids and byte hashes."""

    name: str
    emb: np.ndarray
    uids: np.ndarray
    sha1: np.ndarray


@dataclass
class StepOutput:
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # column name → n float values (NaN where unscored)
    drop: np.ndarray | None = None  # n bool, rows this step removes (a subset of ctx.alive)
    dup_of: np.ndarray | None = None  # n int64 row index of the kept original, -1 if none
    weights: np.ndarray | None = None  # n training weights (a reweighting step); renormalised over the final kept rows
    info: dict[str, Any] = field(default_factory=dict)
    # string columns for the manifest (quality_issue, suggested_label; dup_of = a uid outside the store, e.g. an eval row)
    text: dict[str, np.ndarray] = field(default_factory=dict)


StepFn = Callable[..., StepOutput]


@dataclass(frozen=True)
class StepSpec:
    fn: StepFn
    reason: str  # manifest reason for rows it drops
    knobs: frozenset[str]  # accepted keyword knobs
    orientation: str  # for run.json


def budget_for(ctx: ScoringContext, keep_fraction: float) -> int:
    """Rows to keep for a fraction of all scorable rows; an error if earlier steps already left fewer."""
    budget = int(round(keep_fraction * ctx.n_scorable))
    if budget < 1:
        raise ValueError(
            f"keep_fraction {keep_fraction} of {ctx.n_scorable} scorable rows keeps no row; raise keep_fraction"
        )
    alive = int(ctx.alive.sum())
    if budget > alive:
        raise ValueError(
            f"keep_fraction {keep_fraction} asks for {budget} rows but only {alive} are left after earlier steps; "
            "keep_fraction is a fraction of all scorable rows"
        )
    return budget


def select_among_alive(
    ctx: ScoringContext, scores: np.ndarray, keep_fraction: float, *, rule: str = "hard", **rule_knobs: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """Runs the shared selector on the alive rows; returns the n-long drop mask and the selection note."""
    from pipeline.select import select

    budget = budget_for(ctx, keep_fraction)
    rows = np.flatnonzero(ctx.alive)
    labels = ctx.labels[rows] if ctx.labels is not None else None
    # per-row knobs (embeddings for moderate, cut_scores for CCS) follow the rows
    rule_knobs = {k: v[rows] if isinstance(v, np.ndarray) and len(v) == len(ctx.alive) else v for k, v in rule_knobs.items()}
    chosen = select(scores[rows], budget=budget, rule=rule, labels=labels, seed=ctx.seed, **rule_knobs)
    drop = np.zeros(len(ctx.alive), dtype=bool)
    drop[rows[~chosen.keep]] = True
    return drop, {"rule": chosen.rule, "why": chosen.why, "budget": budget, **chosen.info}


# ---- step functions ------------------------------------------------------------------------------


def step_exact_dup(ctx: ScoringContext) -> StepOutput:
    from scorers.exact_dup import exact_duplicates

    dup_of = exact_duplicates(ctx.sha1, ctx.uids)
    drop = (dup_of >= 0) & ctx.alive
    return StepOutput(drop=drop, dup_of=np.where(drop, dup_of, -1), info={"duplicates": int(drop.sum())})


def step_random(ctx: ScoringContext, *, keep_fraction: float = 1.0, seed: int | None = None) -> StepOutput:
    from scorers.random import random_scores

    scores = random_scores(len(ctx.uids), seed=ctx.seed if seed is None else seed)
    out = StepOutput(scores={"score_random": scores})
    if keep_fraction < 1.0:
        out.drop, out.info = select_among_alive(ctx, scores, keep_fraction, rule="hard")
    return out


def _alive_view(ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows still alive: (row indices, embeddings, cluster ids, uids)."""
    rows = np.flatnonzero(ctx.alive)
    if len(rows) == len(ctx.alive):  # nothing dropped yet: no copy of the embeddings (1 GB at 1M × 512 float16)
        return rows, ctx.emb, ctx.kmeans.assignment, ctx.uids
    emb = ctx.emb.subset(rows) if hasattr(ctx.emb, "subset") else ctx.emb[rows]  # a store view stays lazy
    return rows, emb, ctx.kmeans.assignment[rows], ctx.uids[rows]


def _scatter(n: int, rows: np.ndarray, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
    full = np.full(n, fill, dtype=np.float32)
    full[rows] = values
    return full


def step_semdedup(
    ctx: ScoringContext,
    *,
    eps: float | None = None,
    target_keep_fraction: float | None = None,
    eps_grid: list[float] | None = None,
    keep: str = "hard",
    batch_size: int = 4096,
) -> StepOutput:
    """SemDeDup inside each concept cluster on the rows still alive.

    One pass computes every row's max similarity to a higher-ranked row of its cluster; `eps` (or the eps
    that reaches `target_keep_fraction` of the rows entering this step, solved exactly) decides, and the kept
    count for every eps of `eps_grid` goes to run.json. score_semdedup = that max similarity (NaN for the
    first-ranked row of a cluster): higher = more redundant.
    """
    from scorers.semdedup import duplicate_mask, eps_for_keep_fraction, semdedup

    if (eps is None) == (target_keep_fraction is None):
        raise ValueError("semdedup needs exactly one of eps or target_keep_fraction")
    rows, emb, clusters, uids = _alive_view(ctx)
    grid = sorted({float(e) for e in (eps_grid or [])} | ({float(eps)} if eps is not None else set()))
    # dup_of is resolved up to the largest eps passed; when eps is solved for afterwards, pass the widest (2.0).
    widest = [2.0] if eps is None else []
    result = _semdedup_fanned_out(ctx, emb, clusters, uids, eps=grid + widest, keep=keep, batch_size=batch_size)
    if eps is None:
        eps = eps_for_keep_fraction(result.max_sim, target_keep_fraction)
    is_dup = duplicate_mask(result.max_sim, eps)
    dup_local = result.dup_of_at(eps)
    n = len(ctx.uids)
    drop = np.zeros(n, dtype=bool)
    drop[rows[is_dup]] = True
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_of[rows[is_dup]] = rows[dup_local[is_dup]]
    max_sim = np.where(np.isfinite(result.max_sim), result.max_sim, np.nan)
    curve = {f"{e:g}": int((~duplicate_mask(result.max_sim, e)).sum()) for e in grid}
    return StepOutput(
        scores={"score_semdedup": _scatter(n, rows, max_sim)},
        drop=drop,
        dup_of=dup_of,
        info={"eps": float(eps), "keep": keep, "entering": len(rows), "kept_by_eps": curve},
    )


def _semdedup_fanned_out(ctx: ScoringContext, emb: Any, clusters: np.ndarray, uids: np.ndarray, **knobs: Any) -> Any:
    """SemDeDup over batches of whole clusters, as tasks on the run's task runner when there is one.

    A row's result depends only on its own cluster (ranked in uid order, ties by uid), so running batches of
    clusters separately and scattering back gives exactly the one-call result. keep: random ranks by a
    permutation of the uid order of all rows, so it runs as one call.
    """
    from scorers.semdedup import SemDedupResult, semdedup

    common = {"centroids": ctx.kmeans.centroids, "device": ctx.device, "seed": ctx.seed, **knobs}
    batches = cluster_batches(clusters, ctx.cluster_batches) if ctx.fan_out is not None and knobs["keep"] != "random" else []
    if len(batches) < 2:
        return semdedup(emb, clusters, uids=uids, **common)
    gather = emb.subset if hasattr(emb, "subset") else emb.__getitem__  # a lazy store view travels as paths
    parts = ctx.fan_out(semdedup, [{"emb": gather(rows), "cluster_ids": clusters[rows], "uids": uids[rows], **common} for rows in batches])
    n = len(clusters)
    out = SemDedupResult(max_sim=np.empty(n, np.float32), dup_of=np.empty(n, np.int64), rank=np.empty(n, np.int64),
                         dist_to_centroid=np.empty(n, np.float32), duplicate={e: np.empty(n, bool) for e in parts[0].duplicate})
    for rows, part in zip(batches, parts):
        out.max_sim[rows] = part.max_sim
        out.dup_of[rows] = np.where(part.dup_of >= 0, rows[np.maximum(part.dup_of, 0)], -1)
        out.rank[rows] = part.rank
        out.dist_to_centroid[rows] = part.dist_to_centroid
        for e, mask in part.duplicate.items():
            out.duplicate[e][rows] = mask
    return out


def cluster_batches(clusters: np.ndarray, n_batches: int) -> list[np.ndarray]:
    """Row indices cut into at most n_batches groups of whole clusters with about equal pairwise work (Σ size²).

    Greedy: largest cluster first, into the lightest batch. Rows inside a batch are in ascending order.
    """
    sizes = np.bincount(clusters)
    present = np.flatnonzero(sizes)
    n_batches = max(1, min(n_batches, len(present)))
    load = np.zeros(n_batches)
    batch_of = np.empty(len(sizes), dtype=np.int64)
    for c in present[np.argsort(-sizes[present], kind="stable")]:
        b = int(np.argmin(load))
        batch_of[c] = b
        load[b] += float(sizes[c]) ** 2
    row_batch = batch_of[clusters]
    return [rows for b in range(n_batches) if len(rows := np.flatnonzero(row_batch == b))]


def step_dbp(
    ctx: ScoringContext,
    *,
    keep_fraction: float,
    temperature: float = 0.1,
    n_neighbors: int = 20,
    min_per_cluster: int = 1,
    class_balance_ratio: float = 0.0,
    keep: str = "hard",
) -> StepOutput:
    """Concept-complexity pruning (DBP, Abbas et al. ICLR 2024) on the rows still alive.

    Complexity C_j = d_inter·d_intra per cluster, quotas from softmax(C/τ) with one shift λ and exact
    rounding, then the quota farthest-from-centroid rows of each cluster are kept.
    score_dbp_cluster_complexity = C of the row's cluster: higher = more complex concept = more kept.
    """
    from scorers.dbp import cluster_complexity, dbp_quotas, dbp_select
    from scorers.prototypes import distance_to_centroid

    centroids = ctx.kmeans.centroids
    rows = np.flatnonzero(ctx.alive)
    clusters, uids = ctx.kmeans.assignment[rows], ctx.uids[rows]
    # Distances streamed once over all rows (a row's value does not depend on where it sits), then the alive rows':
    # no gathered copy of the embeddings, one pass instead of two.
    dist = distance_to_centroid(ctx.emb, ctx.kmeans.assignment, centroids)[rows]
    complexity = cluster_complexity(None, clusters, centroids, n_neighbors=min(n_neighbors, len(centroids) - 1),
                                    dist_to_centroid=dist)
    budget = budget_for(ctx, keep_fraction)
    quotas = dbp_quotas(
        complexity.complexity,
        complexity.sizes,
        budget=budget,
        temperature=temperature,
        min_per_cluster=min_per_cluster,
        class_balance_ratio=class_balance_ratio,
    )
    kept = dbp_select(None, clusters, centroids, quotas, keep=keep, uids=uids, seed=ctx.seed, dist_to_centroid=dist)
    n = len(ctx.uids)
    drop = np.zeros(n, dtype=bool)
    drop[rows[~kept]] = True
    table = [
        {"cluster": j, "size": int(complexity.sizes[j]), "d_intra": float(complexity.d_intra[j]),
         "d_inter": float(complexity.d_inter[j]), "complexity": float(complexity.complexity[j]), "quota": int(quotas[j])}
        for j in range(len(quotas))
    ]
    return StepOutput(
        scores={"score_dbp_cluster_complexity": _scatter(n, rows, complexity.complexity[clusters])},
        drop=drop,
        info={"budget": budget, "temperature": temperature, "n_neighbors": n_neighbors, "quotas": table},
    )


def step_prototype(ctx: ScoringContext, *, keep: str = "hard", keep_fraction: float | None = None) -> StepOutput:
    """Prototype score (Sorscher et al. 2022): cosine distance to the nearest k-means centroid.

    score_prototype is the distance itself (higher = farther from its prototype = harder). With keep_fraction,
    keeps the farthest (keep: hard) or nearest (keep: easy) rows, class-balanced when labels exist.
    """
    from scorers.prototypes import prototype_scores

    if keep not in ("hard", "easy"):
        raise ValueError(f"prototype keep must be 'hard' or 'easy', got {keep!r}")
    distance = prototype_scores(ctx.emb, ctx.kmeans.centroids, keep="hard", device=ctx.device)
    out = StepOutput(scores={"score_prototype": distance})
    if keep_fraction is not None:
        out.drop, out.info = select_among_alive(ctx, distance, keep_fraction, rule=keep)
    return out


def _labels_or_error(ctx: ScoringContext, scorer: str) -> np.ndarray:
    if ctx.labels is None:
        raise ValueError(f"{scorer} needs labels; the source has none (image_folder class subfolders, or a label column)")
    return ctx.labels


def _select_knobs(ctx: ScoringContext, rule: str, cut_scores: np.ndarray | None = None) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    if rule == "moderate":
        knobs["embeddings"] = ctx.emb
    if rule in ("ccs", "heuristic") and cut_scores is not None:
        knobs["cut_scores"] = cut_scores
    return knobs


def step_el2n(
    ctx: ScoringContext,
    *,
    keep_fraction: float | None = None,
    rule: str = "auto",
    head: str = "linear",
    n_seeds: int = 5,
    n_folds: int = 5,
    epochs: int = 10,
    score_epoch: int = 2,
    with_aum: bool = False,
    seed: int | None = None,
) -> StepOutput:
    """EL2N and GraNd (Paul et al. 2021) from out-of-fold proxy heads on the embeddings of the rows still alive.

    score_el2n, score_grand: higher = harder (kept first by rule hard). For the linear head GraNd is exactly
    EL2N·√(‖h‖²+1), so on unit embeddings it ranks like EL2N. With with_aum, score_aum from the same training
    (low = likely mislabeled) and CCS cuts by it, as Zheng et al. do. With keep_fraction, `rule` selects:
    auto (default) picks among hard / easy / ccs / moderate / random by held-out probe accuracy on these scores
    (pipeline/evaluate.py choose_rule; evidence in run.json, cached per store); heuristic = hard at ≥ 70% kept, CCS
    below; or any rule of pipeline/select.py.
    """
    from scorers.el2n import el2n_embedding_scores

    labels = _labels_or_error(ctx, "el2n")
    rows = np.flatnonzero(ctx.alive)
    result = el2n_embedding_scores(
        ctx.emb[rows], labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs, score_epoch=score_epoch,
        return_aum=with_aum, device=ctx.device, seed=ctx.seed if seed is None else seed,
    )
    n = len(ctx.uids)
    out = StepOutput(
        scores={"score_el2n": _scatter(n, rows, result.el2n), "score_grand": _scatter(n, rows, result.grand)},
        info={"proxy": result.info},
    )
    cut = None
    if result.aum is not None:
        out.scores["score_aum"] = _scatter(n, rows, result.aum)
        cut = -out.scores["score_aum"]
    if keep_fraction is not None:
        if rule == "auto":
            from pipeline.evaluate import auto_rule

            out.info["auto_evidence"] = auto_rule(ctx, out.scores["score_el2n"], budget_for(ctx, keep_fraction))
            rule = out.info["auto_evidence"]["rule"]
        out.drop, note = select_among_alive(ctx, out.scores["score_el2n"], keep_fraction, rule=rule, **_select_knobs(ctx, rule, cut))
        out.info.update(note)
    return out


def step_aum(
    ctx: ScoringContext,
    *,
    keep_fraction: float | None = None,
    head: str = "linear",
    n_seeds: int = 5,
    n_folds: int = 5,
    epochs: int = 10,
    seed: int | None = None,
) -> StepOutput:
    """AUM, area under the margin (Pleiss et al. 2020), out of fold on the embeddings of the rows still alive.

    score_aum: mean over epochs of (assigned logit − largest other logit); LOW = likely mislabeled.
    With keep_fraction, keeps the highest-AUM rows (drops the likeliest label errors), class-balanced.
    """
    from scorers.aum import aum_embedding_scores

    labels = _labels_or_error(ctx, "aum")
    rows = np.flatnonzero(ctx.alive)
    aum = aum_embedding_scores(ctx.emb[rows], labels[rows], head=head, n_seeds=n_seeds, n_folds=n_folds, epochs=epochs,
                               device=ctx.device, seed=ctx.seed if seed is None else seed)
    out = StepOutput(scores={"score_aum": _scatter(len(ctx.uids), rows, aum)})
    if keep_fraction is not None:
        out.drop, out.info = select_among_alive(ctx, out.scores["score_aum"], keep_fraction, rule="hard")
    return out


def step_coreset_weight(
    ctx: ScoringContext, *, coreset_fraction: float = 0.05, k: int = 1, same_class: bool = False, seed: int | None = None
) -> StepOutput:
    """Coreset reweighting, "The Power of Few" (Jafari et al. ICASSP 2024), over the rows still alive.

    Per-class Moderate coreset → Meta-Weight-Net on it (with a held-out meta split) → every row takes the weight
    of its nearest coreset row (k > 1: distance-weighted average). Drops nothing; fills the manifest's `weight`
    (mean 1 over kept rows; train with Σwℓ/Σw or the weighted sampler). score_coreset_weight: higher = counts more.
    """
    from scorers.reweight import coreset_reweight

    labels = _labels_or_error(ctx, "coreset_weight")
    result = coreset_reweight(ctx.emb, labels, coreset_fraction=coreset_fraction, keep=ctx.alive.copy(), k=k,
                              same_class=same_class, seed=ctx.seed if seed is None else seed, device=ctx.device)
    score = np.where(ctx.alive, result.weights, np.nan).astype(np.float32)
    return StepOutput(scores={"score_coreset_weight": score}, weights=result.weights, info=result.info)


def step_ot_target(
    ctx: ScoringContext,
    *,
    target: dict[str, Any],
    keep_fraction: float | None = None,
    estimate_ratio: bool = False,
    eps: float = 0.05,
    whiten: bool = True,
    features: str = "embedding",
    grad_dim: int = 256,
    k_folds: int = 5,
) -> StepOutput:
    """Targeted selection by optimal transport (TAROT, vita-epfl; per-sample values as in LAVA / GOT-D).

    Whitened features; entropic OT between a pool sample and the embedded `target` set (POT) gives the target
    potential g; every alive row's score is minus its c-transform (streamed in chunks, never N×|T|), so
    score_ot: higher = closer to the target domain. Keeps the top `keep_fraction` of all rows, or with
    `estimate_ratio` TAROT's OT-distance minimisation (k_folds over the target, per-target neighbourhoods grown until
    the OT distance to the other folds stops falling) estimates the ratio, and the top ratio·N rows by score_ot are
    kept (ratio, OTM union size and the distance curve go to run.json).
    `features`: "embedding" (default) or "gradient" — projected per-sample gradients (`grad_dim`, seeded Rademacher
    JL) of a proxy linear softmax head trained on the alive rows' embeddings and labels (needs labels); target rows
    carry no labels, so their gradients use the head's predicted label.
    """
    from pipeline.fill_store import target_key
    from scorers.ot_select import estimate_selection_ratio, fit_proxy_head, gradient_features, ot_scores

    if (keep_fraction is None) == (not estimate_ratio):
        raise ValueError("ot_target needs exactly one of keep_fraction or estimate_ratio: true")
    if features not in ("embedding", "gradient"):
        raise ValueError(f"ot_target features must be 'embedding' or 'gradient', got {features!r}")
    target_emb = ctx.targets.get(target_key(target))
    if target_emb is None:
        raise ValueError(f"target {target} was not embedded before scoring")
    rows = np.flatnonzero(ctx.alive)
    pool_x, target_x = ctx.emb[rows], target_emb
    info: dict[str, Any] = {"eps": eps, "whiten": whiten, "target_rows": len(target_emb), "features": features}
    if features == "gradient":
        labels = _labels_or_error(ctx, "ot_target with features: gradient")
        head = fit_proxy_head(pool_x, labels[rows], seed=ctx.seed)
        pool_x = gradient_features(pool_x, head, labels[rows], grad_dim=grad_dim, seed=ctx.seed)
        target_x = gradient_features(target_emb, head, None, grad_dim=grad_dim, seed=ctx.seed)
        info.update(grad_dim=grad_dim, proxy_head=head.info, target_labels="predicted by the proxy head")
    # Gradient rows are scaled to unit norm after whitening (TAROT): their length mostly says how confidently the head
    # fits a row, so without it every well-fitted row of any domain sits next to the target.
    result = ot_scores(pool_x, target_x, eps=eps, whiten=whiten, seed=ctx.seed, device=ctx.device,
                       normalize=features == "gradient")
    n = len(ctx.uids)
    scores = _scatter(n, rows, result.score)
    info.update(result.info)
    if estimate_ratio:
        estimate = estimate_selection_ratio(pool_x, target_x, k_folds=k_folds, whiten=whiten, seed=ctx.seed,
                                            device=ctx.device)
        info.update(estimated_ratio=estimate.ratio, otm_selected=estimate.k, otm=estimate.info,
                    ratio_curve={"neighbours_per_target": estimate.k_grid, "mean_selected_fraction": estimate.ratios,
                                 "mean_ot_distance": estimate.distance})
        keep_fraction = max(1, int(np.ceil(estimate.ratio * len(rows)))) / ctx.n_scorable
    drop, note = select_among_alive(ctx, scores, keep_fraction, rule="hard", class_balanced=False)
    return StepOutput(scores={"score_ot": scores}, drop=drop, info={**info, **note})


STEPS: dict[str, StepSpec] = {
    "exact_dup": StepSpec(step_exact_dup, "exact_dup", frozenset(), "drops byte-identical copies; keeps the smallest uid"),
    "random": StepSpec(
        step_random,
        "random",
        frozenset({"keep_fraction", "seed"}),
        "score_random: uniform, seeded; keeps a class-balanced random subset",
    ),
    "semdedup": StepSpec(
        step_semdedup,
        "semdedup",
        frozenset({"eps", "target_keep_fraction", "eps_grid", "keep", "batch_size"}),
        "score_semdedup: max cosine similarity to a higher-ranked row of the same cluster; higher = more redundant",
    ),
    "dbp": StepSpec(
        step_dbp,
        "dbp_quota",
        frozenset({"keep_fraction", "temperature", "n_neighbors", "min_per_cluster", "class_balance_ratio", "keep"}),
        "score_dbp_cluster_complexity: d_inter·d_intra of the row's cluster; higher = more complex concept, larger quota",
    ),
    "prototype": StepSpec(
        step_prototype,
        "prototype",
        frozenset({"keep", "keep_fraction"}),
        "score_prototype: cosine distance to the nearest centroid; higher = harder (kept first with keep: hard)",
    ),
    "el2n": StepSpec(
        step_el2n,
        "el2n",
        frozenset({"keep_fraction", "rule", "head", "n_seeds", "n_folds", "epochs", "score_epoch", "with_aum", "seed"}),
        "score_el2n, score_grand: higher = harder (out-of-fold proxy heads); score_aum: low = likely mislabeled",
    ),
    "aum": StepSpec(
        step_aum,
        "aum",
        frozenset({"keep_fraction", "head", "n_seeds", "n_folds", "epochs", "seed"}),
        "score_aum: area under the margin; low = likely mislabeled; keeps the highest",
    ),
    "coreset_weight": StepSpec(
        step_coreset_weight,
        "select",  # drops nothing
        frozenset({"coreset_fraction", "k", "same_class", "seed"}),
        "score_coreset_weight: propagated Meta-Weight-Net weight, mean 1 over kept rows; higher = counts more",
    ),
    "ot_target": StepSpec(
        step_ot_target,
        "ot",
        frozenset({"target", "keep_fraction", "estimate_ratio", "eps", "whiten", "features", "grad_dim", "k_folds"}),
        "score_ot: minus the c-transform of the target's OT potential; higher = closer to the target domain",
    ),
}


def register_step(name: str, spec: StepSpec) -> None:
    if name in STEPS:
        raise ValueError(f"a step named {name!r} is already registered")
    STEPS[name] = spec


# Steps that train on labels: a source without labels is refused before embedding (config.check_plan_size).
NEEDS_LABELS = frozenset({"el2n", "aum", "coreset_weight"})
# Knob pairs of which a step needs exactly one (a false `estimate_ratio` counts as absent).
_EXACTLY_ONE: dict[str, tuple[str, str]] = {
    "semdedup": ("eps", "target_keep_fraction"),
    "ot_target": ("keep_fraction", "estimate_ratio"),
}
# Fraction knobs: (low, high, high included).
_FRACTIONS: dict[str, tuple[float, float, bool]] = {
    "keep_fraction": (0.0, 1.0, True),
    "target_keep_fraction": (0.0, 1.0, True),
    "coreset_fraction": (0.0, 1.0, True),
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def check_steps(steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Validates step names and knobs before any work starts: unknown scorers and knobs, missing required knobs,
    knobs that exclude each other, fractions outside their range, a `target` that is not a source mapping."""
    import inspect

    for position, (name, knobs) in enumerate(steps):
        if name not in STEPS:
            raise ValueError(f"step {position}: unknown scorer {name!r}; known: {sorted(STEPS)}")
        where = f"step {position} ({name})"
        unknown = set(knobs) - STEPS[name].knobs
        if unknown:
            raise ValueError(f"{where}: unknown knobs {sorted(unknown)}; accepted: {sorted(STEPS[name].knobs)}")
        params = inspect.signature(STEPS[name].fn).parameters.values()
        required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        missing = [k for k in required if knobs.get(k) is None]
        if missing:
            raise ValueError(f"{where}: needs {', '.join(missing)}")
        for knob, (low, high, high_ok) in _FRACTIONS.items():
            value = knobs.get(knob)
            if value is None:
                continue
            if not (_is_number(value) and low < value and (value <= high if high_ok else value < high)):
                interval = f"({low:g}, {high:g}{']' if high_ok else ')'}"
                raise ValueError(f"{where}: {knob} must be in {interval}, got {value!r}")
        pair = _EXACTLY_ONE.get(name)
        if pair is not None:
            given = [k for k in pair if knobs.get(k) not in (None, False)]
            if len(given) != 1:
                raise ValueError(f"{where}: give exactly one of {pair[0]} or {pair[1]}" + (" (got both)" if given else ""))
        target = knobs.get("target")
        if target is not None and not (isinstance(target, dict) and "kind" in target):
            raise ValueError(f"{where}: target must be a source mapping such as {{kind: image_folder, root: ...}}, got {target!r}")


def run_steps(ctx: ScoringContext, steps: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Applies steps in order. Returns the manifest columns for scored rows and one note per step.

    Columns: reason (None where kept), dup_of (row index or -1), weight (mean 1 over the kept rows, 0 elsewhere;
    from the last reweighting step, else uniform) and every score column.
    """
    n = len(ctx.uids)
    reason = np.full(n, None, dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    weights = np.ones(n, dtype=np.float64)
    scores: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    notes: list[dict[str, Any]] = []
    for name, knobs in steps:
        spec = STEPS[name]
        failpoint("score_step")
        out = spec.fn(ctx, **knobs)
        for col, values in out.scores.items():
            if col in scores:
                raise ValueError(f"two steps write the column {col}")
            scores[col] = np.asarray(values, dtype=np.float32)
        if out.weights is not None:
            weights = np.asarray(out.weights, dtype=np.float64)
        dropped = 0
        if out.drop is not None:
            drop = out.drop & ctx.alive
            reason[drop] = spec.reason
            if out.dup_of is not None:
                dup_of[drop] = out.dup_of[drop]
            for col, values in out.text.items():
                # a later step's value never overwrites an earlier one's (only rows this step drops are written)
                key = "dup_of_uid" if col == "dup_of" else col
                column = text.setdefault(key, np.full(n, None, dtype=object))
                column[drop] = np.asarray(values, dtype=object)[drop]
            ctx.alive = ctx.alive & ~drop
            dropped = int(drop.sum())
        notes.append(
            {"scorer": name, "knobs": knobs, "dropped": dropped, "alive_after": int(ctx.alive.sum()), "orientation": spec.orientation, **out.info}
        )
    return {"reason": reason, "dup_of": dup_of, "weight": mean_one_over(weights, ctx.alive), **scores, **text}, notes


def mean_one_over(weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Weights scaled to mean 1 over the kept rows, 0 elsewhere (float32, the manifest's `weight`)."""
    out = np.where(keep, weights, 0.0)
    total = out.sum()
    if keep.any():
        if not np.isfinite(total) or total <= 0:
            raise ValueError("the kept rows' weights sum to zero or are not finite")
        out = out * (keep.sum() / total)
    return out.astype(np.float32)


def _register_basic_steps() -> None:
    """The #17 checks (pipeline/basic_steps.py); their knobs are their keyword-only parameters."""
    import inspect

    from pipeline import basic_steps as b

    table = (
        ("quality", b.step_quality, "low_quality",
         "score_quality_*: statistics measured while decoding (blur: contrast-normalised Laplacian variance, higher = sharper); "
         "rows failing a check are dropped, quality_issue names the checks"),
        ("outlier", b.step_outlier, "outlier", "score_outlier: k-th NN cosine distance, score_outlier_density: local density ratio; higher = more outlying"),
        ("leak", b.step_leak, "leak", "score_leak: best cosine similarity to an eval row within eps; dup_of = that eval row's uid"),
        ("label_issues", b.step_label_issues, "label_issue", "score_label_quality: cleanlab self-confidence (out of fold); low = label likely wrong"),
        ("head", b.step_head, "head", "score_<name>: the head's output on the embedding; keep: high or low decides"),
        ("clip_score", b.step_clip_score, "clip_score", "score_clip: cosine(image, caption) in the same CLIP model; higher = agree more"),
        ("label_agreement", b.step_label_agreement, "label_mismatch",
         "score_label_rank: classes whose prompt scores above the own label's (0 = own label on top); dropped when ≥ top_k"),
    )
    for name, fn, reason, orientation in table:
        knobs = frozenset(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)
        register_step(name, StepSpec(fn, reason, knobs, orientation))


_register_basic_steps()
NEEDS_LABELS = NEEDS_LABELS | {"label_issues", "label_agreement"}
