"""Selection measured against random: cheap probes on frozen embeddings, trained on a selection and on random subsets.

Method (what DataComp-style evaluations do, at the scale of a curation run):

- **Held-out split**: a row is a *test* row when ``sha1("winnow-evaluate-v1\\0" + uid)``, read as a 64-bit integer
  over 2^64, is below ``holdout_fraction`` (default 0.2). The split depends on the uid only: stable across runs,
  stores and row order, and independent of any score. Test rows never train a probe and are never selected by the
  sweep; the *pool* is the other rows. A user eval source (``eval_source:``) replaces the split (then every row is
  pool). A run's own selection was made over all rows, so for `winnow evaluate RUN_DIR` the kept rows that lie in the
  test split simply do not train (the test split is the same for every candidate, so the comparison stays fair).
- **Probe**: multinomial logistic regression (``probe="linear"``) on the pool-standardised embeddings, L2 ``l2`` on
  the weights, solved to convergence with L-BFGS (deterministic: the only randomness is the subset), or a one-hidden-
  layer MLP (``probe="mlp"``: AdamW, the same number of steps for every subset size, seeds vary init and order).
  Many probes train together as one batched model (independent weights).
- **Random baseline**: class-balanced random subsets of the same size as the selection (scorers.select's
  ``random`` rule: class budgets in proportion to the pool's class sizes), one per seed.
- **Significance**: paired bootstrap over the test rows and over the seeds: each replicate resamples the test rows
  (Poisson(1) weights, the same for both sides: paired) and, independently, each side's seeds; the difference of the two mean
  accuracies over ``n_boot`` replicates gives the percentile CI and the two-sided p-value
  ``min(1, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)))``. The seed std alone ignores the test set's sampling error and makes
  0.1 pp differences look significant; the test-row resampling adds it back.
- **Sweep** (:func:`sweep`): candidate rules (hard, easy, ccs, moderate, prototypes, dbp, random) at a grid of kept
  fractions, on scores computed once (:func:`sweep_scores`: out-of-fold EL2N of linear heads, prototype distance,
  concept clusters); recommendation = best rule per fraction and the *suggested budget*, the smallest fraction whose
  best proxy accuracy is within ``tolerance`` of the full pool's.

Accuracies are fractions in [0, 1]; text output says percentage points (pp).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig, SourceConfig

HOLDOUT_SALT = "winnow-evaluate-v1"
SWEEP_RULES = ("hard", "easy", "ccs", "moderate", "prototypes", "dbp", "random")
SWEEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7)
SEEDED_RULES = frozenset({"random", "ccs"})  # rules whose subset changes with the seed

__all__ = [
    "ProbeSpec", "holdout_mask", "standardise", "train_probes", "paired_bootstrap", "evaluate_selection",
    "SweepScores", "sweep_scores", "select_rule", "sweep", "SWEEP_RULES", "SWEEP_FRACTIONS",
]


@dataclass(frozen=True)
class ProbeSpec:
    """The proxy learner. linear: L2-regularised softmax regression, L-BFGS to convergence (``max_iter``).
    mlp: ``hidden`` ReLU units, AdamW ``lr``/``l2`` for ``steps`` steps of ``batch_size`` (equal steps for every
    subset size, as data_diet and CCS train every subset for the same iterations)."""

    kind: str = "linear"
    l2: float = 1e-3
    max_iter: int = 100
    hidden: int = 256
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"probe must be 'linear' or 'mlp', got {self.kind!r}")
        for name in ("max_iter", "hidden", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name} must be >= 1, got {getattr(self, name)}")
        if not self.l2 >= 0 or not self.lr > 0:
            raise ValueError("probe l2 must be >= 0 and lr > 0")


# ---- split and features ---------------------------------------------------------------------------------------------


def holdout_mask(uids: Sequence[str], fraction: float = 0.2) -> np.ndarray:
    """True for the test rows of the uid-hash split (see the module docstring); bool ``[n]``."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    cut = int(fraction * 2**64)
    salt = (HOLDOUT_SALT + "\0").encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha1(salt + str(u).encode()).digest()[:8], "big") < cut for u in uids),
        dtype=bool, count=len(uids),
    )


def standardise(pool: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pool-standardised float32 copies of ``pool`` and ``others`` (mean/std of the pool; std floored at 1e-6)."""
    x = np.asarray(pool, dtype=np.float32)
    mu = x.mean(0, dtype=np.float64).astype(np.float32)
    sd = np.maximum(x.std(0, dtype=np.float64), 1e-6).astype(np.float32)
    return tuple(((np.asarray(a, dtype=np.float32) - mu) / sd) for a in (x, *others))


def class_codes(*label_arrays: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Labels of several arrays mapped to one set of int codes; returns (codes per array, classes)."""
    classes = np.unique(np.concatenate([np.asarray(a).astype(str) for a in label_arrays]))
    return [np.searchsorted(classes, np.asarray(a).astype(str)).astype(np.int64) for a in label_arrays], classes


# ---- probes -----------------------------------------------------------------------------------------------------------


def train_probes(
    x: np.ndarray,
    y: np.ndarray,
    subsets: Sequence[np.ndarray],
    x_test: np.ndarray,
    *,
    n_classes: int,
    probe: ProbeSpec = ProbeSpec(),
    seeds: Sequence[int] | None = None,
    max_group_bytes: int = 256 << 20,
) -> np.ndarray:
    """Trains one probe per subset (row indices into ``x``) and returns its test predictions, int64 ``[M, T]``.

    ``x``/``x_test`` are float32 features (standardise them with :func:`standardise`), ``y`` int codes in
    ``[0, n_classes)``. Subsets of equal size train together as one batched model, at most ``max_group_bytes`` of
    gathered features at a time. ``seeds`` (one per subset; default 0) set the MLP's init and batch order.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
    seeds = list(seeds) if seeds is not None else [0] * len(subsets)
    if len(seeds) != len(subsets):
        raise ValueError("give one seed per subset")
    out = np.empty((len(subsets), test.shape[0]), dtype=np.int64)
    by_size: dict[int, list[int]] = {}
    for i, s in enumerate(subsets):
        if len(s) == 0:
            raise ValueError("a probe subset is empty")
        by_size.setdefault(len(s), []).append(i)
    if probe.kind == "linear":
        # All subsets of the pool in one masked problem: one wide matmul over the pool instead of M narrow ones.
        per_group = max(1, max_group_bytes // (xt.shape[0] * n_classes * 4 * 3))
        for start in range(0, len(subsets), per_group):
            group = list(range(start, min(start + per_group, len(subsets))))
            mask = torch.zeros(xt.shape[0], len(group))
            for j, i in enumerate(group):
                mask[torch.as_tensor(np.asarray(subsets[i], dtype=np.int64)), j] = 1.0
            w, b = _fit_linear(xt, yt, mask, n_classes, probe)
            logits = (test @ w.reshape(w.shape[0], -1) + b.reshape(1, -1)).reshape(test.shape[0], len(group), n_classes)
            out[group] = logits.argmax(-1).T.numpy()
        return out
    d = xt.shape[1]
    for size, ids in by_size.items():
        per_group = max(1, max_group_bytes // (size * d * 4))
        for start in range(0, len(ids), per_group):
            group = ids[start:start + per_group]
            idx = torch.as_tensor(np.stack([np.asarray(subsets[i], dtype=np.int64) for i in group]))
            out[group] = _fit_mlp(xt, yt, idx, test, n_classes, probe, [seeds[i] for i in group]).argmax(-1).numpy()
    return out


def _fit_linear(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, n_classes: int,
                probe: ProbeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """M independent L2 softmax regressions, model j on the rows where ``mask[:, j]`` is 1, by one L-BFGS on the sum
    of their objectives (block-separable, so it converges to each one's optimum). Returns w [d, M, C], b [M, C]."""
    n, d = x.shape
    m = mask.shape[1]
    w = torch.zeros(d, m * n_classes, requires_grad=True)
    b = torch.zeros(m * n_classes, requires_grad=True)
    weight = mask / mask.sum(0, keepdim=True)  # each model's mean loss over its own rows
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=probe.max_iter, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    pick = y.view(n, 1, 1).expand(n, m, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = torch.log_softmax((x @ w + b).view(n, m, n_classes), dim=-1)
        loss = -(logp.gather(2, pick).squeeze(2) * weight).sum() + 0.5 * probe.l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().view(d, m, n_classes), b.detach().view(m, n_classes)


def _fit_mlp(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, test: torch.Tensor, n_classes: int, probe: ProbeSpec,
             seeds: list[int]) -> torch.Tensor:
    m, k = idx.shape
    d, h = x.shape[1], probe.hidden
    params = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        params.append([(torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan) for shape, fan in
                       (((d, h), d), ((1, h), d), ((h, n_classes), h), ((1, n_classes), h))])
    w1, b1, w2, b2 = (torch.stack([p[j] for p in params]).requires_grad_() for j in range(4))
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=probe.lr, weight_decay=probe.l2)
    gens = [torch.Generator().manual_seed(10_000 + int(s)) for s in seeds]
    bs = min(probe.batch_size, k)
    order, pos = None, k
    for _ in range(probe.steps):
        if pos + bs > k:
            order = idx.gather(1, torch.stack([torch.randperm(k, generator=g) for g in gens]))
            pos = 0
        ids = order[:, pos:pos + bs]
        pos += bs
        logits = torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x[ids], w1)), w2)
        loss = F.cross_entropy(logits.reshape(-1, n_classes), y[ids].reshape(-1), reduction="sum") / bs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        t = test.unsqueeze(0).expand(m, -1, -1)
        return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, t, w1)), w2)


# ---- significance -----------------------------------------------------------------------------------------------------


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Compares two methods from per-seed, per-test-row correctness (bool ``[S_a, T]`` and ``[S_b, T]``, same rows).

    Each replicate reweights the T test rows by Poisson(1) counts (the Poisson bootstrap; shared by both sides: paired)
    and draws each side's seeds with replacement; statistic = mean accuracy of a − mean accuracy of b. Returns the point estimates, each side's
    percentile CI, the difference's CI and the two-sided bootstrap p-value (resolution 1/n_boot).
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float32))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float32))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"both sides need the same non-empty test rows, got {a.shape} and {b.shape}")
    t = a.shape[1]
    rng = np.random.default_rng(seed)
    ma, mb = np.empty(n_boot), np.empty(n_boot)
    for start in range(0, n_boot, 256):
        reps = min(256, n_boot - start)
        # Poisson(1) counts per test row: the Poisson bootstrap (a multinomial draw's fast, large-T equivalent),
        # the same counts for both sides (paired)
        counts = rng.poisson(1.0, size=(reps, t)).astype(np.float32)
        total = np.maximum(counts.sum(1, keepdims=True), 1.0)
        acc_a, acc_b = counts @ a.T / total, counts @ b.T / total  # [reps, S]
        pick_a = rng.integers(a.shape[0], size=(reps, a.shape[0]))
        pick_b = rng.integers(b.shape[0], size=(reps, b.shape[0]))
        ma[start:start + reps] = np.take_along_axis(acc_a, pick_a, 1).mean(1)
        mb[start:start + reps] = np.take_along_axis(acc_b, pick_b, 1).mean(1)
    diff = ma - mb
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2

    def ci(v: np.ndarray) -> list[float]:
        return [float(np.quantile(v, lo)), float(np.quantile(v, hi))]

    p = min(1.0, 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean())))
    seed_acc_a, seed_acc_b = a.mean(1, dtype=np.float64), b.mean(1, dtype=np.float64)
    return {
        "a": {"accuracy": float(seed_acc_a.mean()), "ci": ci(ma), "seed_std": _std(seed_acc_a), "per_seed": seed_acc_a.tolist()},
        "b": {"accuracy": float(seed_acc_b.mean()), "ci": ci(mb), "seed_std": _std(seed_acc_b), "per_seed": seed_acc_b.tolist()},
        "difference": float(seed_acc_a.mean() - seed_acc_b.mean()),
        "difference_ci": ci(diff),
        "p_value": p,
        "level": level,
        "n_boot": n_boot,
        "n_test": t,
    }


def _std(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def verdict(cmp: dict[str, Any], alpha: float = 0.05) -> str:
    """'better' / 'worse' than the baseline when the p-value is below alpha, else 'no significant difference'."""
    if cmp["p_value"] < alpha:
        return "better" if cmp["difference"] > 0 else "worse"
    return "no significant difference"


# ---- one selection against random -------------------------------------------------------------------------------------


def _random_subsets(y: np.ndarray, size: int, seeds: Sequence[int]) -> list[np.ndarray]:
    from scorers.select import select

    return [np.flatnonzero(select(None, budget=size, rule="random", labels=y, seed=int(s)).keep) for s in seeds]


def evaluate_selection(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    keep: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seeds: int = 5,
    probe: ProbeSpec = ProbeSpec(),
    include_full: bool = True,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Probe accuracy of the pool rows ``keep`` (bool ``[n_pool]``) against class-balanced random subsets of the
    same size (``seeds`` draws) and, with ``include_full``, the whole pool. Labels may be ints or strings.

    Returns a JSON-ready dict: selection / random / full accuracies with bootstrap CIs, the difference
    (selection − random) with its CI and p-value, and a verdict.
    """
    t0 = time.perf_counter()
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(y_pool),):
        raise ValueError(f"keep must have one value per pool row ({len(y_pool)}), got shape {keep.shape}")
    k = int(keep.sum())
    if k == 0:
        raise ValueError("the selection keeps no pool row: nothing to train a probe on")
    (yc, ytc), classes = class_codes(y_pool, y_test)
    xs, xts = standardise(x_pool, x_test)
    seed_list = list(range(seeds))
    kept_seeds = seed_list if probe.kind == "mlp" else [0]  # a linear probe is deterministic given its subset
    subsets = [np.flatnonzero(keep)] * len(kept_seeds) + _random_subsets(yc, k, seed_list)
    probe_seeds = kept_seeds + seed_list
    if include_full:
        full_seeds = seed_list if probe.kind == "mlp" else [0]
        subsets += [np.arange(len(yc))] * len(full_seeds)
        probe_seeds += full_seeds
    pred = train_probes(xs, yc, subsets, xts, n_classes=len(classes), probe=probe, seeds=probe_seeds)
    correct = pred == ytc[None, :]
    n_kept = len(kept_seeds)
    sel, rnd = correct[:n_kept], correct[n_kept:n_kept + len(seed_list)]
    cmp = paired_bootstrap(sel, rnd, n_boot=n_boot)
    out: dict[str, Any] = {
        "probe": asdict(probe),
        "n_pool": len(yc), "n_test": len(ytc), "n_kept_in_pool": k, "kept_fraction_of_pool": k / len(yc),
        "seeds": seeds,
        "selection": cmp["a"], "random": cmp["b"],
        "difference": cmp["difference"], "difference_ci": cmp["difference_ci"], "p_value": cmp["p_value"],
        "level": cmp["level"], "verdict": verdict(cmp),
    }
    if include_full:
        full = paired_bootstrap(correct[n_kept + len(seed_list):], rnd, n_boot=n_boot)
        out["full"] = full["a"]
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# ---- sweep ------------------------------------------------------------------------------------------------------------


@dataclass
class SweepScores:
    """Scores over the pool rows, computed once (:func:`sweep_scores`) and shared by every rule and fraction.

    el2n: out-of-fold EL2N (higher = harder); prototype: cosine distance to the nearest centroid (higher = harder);
    cluster / centroids: spherical k-means of the pool (DBP's concept clusters); emb: the pool's unit embeddings
    (Moderate's class medians, DBP's distances).
    """

    emb: np.ndarray
    el2n: np.ndarray
    prototype: np.ndarray
    cluster: np.ndarray
    centroids: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def sweep_scores(emb: np.ndarray, labels: np.ndarray, *, k: int | None = None, n_seeds: int = 2, n_folds: int = 3,
                 seed: int = 0) -> SweepScores:
    """The sweep's scores on the pool's unit embeddings: out-of-fold EL2N of linear heads (``n_seeds`` × ``n_folds``,
    scored after epoch 2), spherical k-means with ``k`` clusters (default ≈ √n/2, at least 2) for the prototype
    distance and DBP."""
    from pipeline.index import KMeansParams, spherical_kmeans
    from scorers.el2n import el2n_embedding_scores
    from scorers.prototypes import prototype_scores

    t0 = time.perf_counter()
    emb = np.asarray(emb, dtype=np.float32)
    res = el2n_embedding_scores(emb, labels, head="linear", n_seeds=n_seeds, n_folds=n_folds, seed=seed)
    k = k or max(2, int(round(math.sqrt(len(emb)) / 2)))
    km = spherical_kmeans(emb, KMeansParams(k=min(k, len(emb)), seed=seed))
    proto = prototype_scores(emb, km.centroids, keep="hard")
    info = {"el2n": {"n_seeds": n_seeds, "n_folds": n_folds, "head": "linear"}, "k": int(km.centroids.shape[0]),
            "seconds": round(time.perf_counter() - t0, 3)}
    return SweepScores(emb=emb, el2n=np.asarray(res.el2n, dtype=np.float64), prototype=np.asarray(proto, np.float64),
                       cluster=km.assignment.astype(np.int64), centroids=km.centroids, info=info)


def select_rule(rule: str, scores: SweepScores, labels: np.ndarray, budget: int, *, seed: int = 0) -> np.ndarray:
    """Pool row indices kept by one sweep rule at ``budget`` (class-balanced except dbp, whose quotas are per concept
    cluster): hard / easy / ccs on EL2N, moderate on the embeddings' distance to the class median, prototypes =
    keep-hardest by prototype distance, dbp = DBP quotas (τ = 0.1) keeping the farthest from the centroid."""
    from scorers.select import select

    if rule in ("hard", "easy", "ccs"):
        return np.flatnonzero(select(scores.el2n, budget=budget, rule=rule, labels=labels, seed=seed).keep)
    if rule == "moderate":
        return np.flatnonzero(select(None, budget=budget, rule="moderate", labels=labels, embeddings=scores.emb).keep)
    if rule == "prototypes":
        return np.flatnonzero(select(scores.prototype, budget=budget, rule="hard", labels=labels, seed=seed).keep)
    if rule == "random":
        return np.flatnonzero(select(None, budget=budget, rule="random", labels=labels, seed=seed).keep)
    if rule == "dbp":
        from scorers.dbp import cluster_complexity, dbp_quotas, dbp_select

        k = scores.centroids.shape[0]
        cc = cluster_complexity(scores.emb, scores.cluster, scores.centroids, n_neighbors=min(20, max(1, k - 1)))
        quotas = dbp_quotas(cc.complexity, cc.sizes, budget=budget, temperature=0.1)
        return np.flatnonzero(dbp_select(scores.emb, scores.cluster, scores.centroids, quotas, keep="hard", seed=seed))
    raise ValueError(f"unknown sweep rule {rule!r}; choose from {SWEEP_RULES}")


def sweep(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    scores: SweepScores,
    *,
    rules: Sequence[str] = SWEEP_RULES,
    fractions: Sequence[float] = SWEEP_FRACTIONS,
    seeds: int = 3,
    probe: ProbeSpec = ProbeSpec(),
    tolerance: float = 0.01,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Every rule at every kept fraction of the pool, probes trained on each, against random and the full pool.

    Seeded rules (random, ccs; every rule with the MLP probe) run ``seeds`` times, the others once. Returns the table
    (per fraction and rule: accuracy, CI, difference from random with CI and p-value), the best rule per fraction and
    the suggested budget (smallest fraction whose best accuracy ≥ full − ``tolerance``; None when none is).
    """
    t0 = time.perf_counter()
    unknown = [r for r in rules if r not in SWEEP_RULES]
    if unknown:
        raise ValueError(f"unknown sweep rules {unknown}; choose from {SWEEP_RULES}")
    rules = list(dict.fromkeys(["random", *rules]))
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"sweep fractions must be in (0, 1), got {f}")
    if len(scores.el2n) != len(y_pool):
        raise ValueError("scores do not cover the pool rows")
    (yc, ytc), classes = class_codes(y_pool, y_test)
    xs, xts = standardise(x_pool, x_test)
    n = len(yc)
    jobs: list[tuple[str, float, int]] = []
    subsets: list[np.ndarray] = []
    for f in fractions:
        budget = max(1, int(math.floor(f * n + 0.5)))
        for rule in rules:
            for s in range(seeds if (rule in SEEDED_RULES or probe.kind == "mlp") else 1):
                jobs.append((rule, f, s))
                subsets.append(select_rule(rule, scores, yc, budget, seed=s))
    full_seeds = seeds if probe.kind == "mlp" else 1
    jobs += [("full", 1.0, s) for s in range(full_seeds)]
    subsets += [np.arange(n)] * full_seeds
    pred = train_probes(xs, yc, subsets, xts, n_classes=len(classes), probe=probe, seeds=[j[2] for j in jobs])
    correct = pred == ytc[None, :]
    rows_of: dict[tuple[str, float], list[int]] = {}
    for i, (rule, f, _) in enumerate(jobs):
        rows_of.setdefault((rule, f), []).append(i)
    full = correct[rows_of[("full", 1.0)]]
    full_acc = float(full.mean())
    table: dict[str, dict[str, Any]] = {}
    best: dict[str, dict[str, Any]] = {}
    for f in fractions:
        key = f"{f:g}"
        rnd = correct[rows_of[("random", f)]]
        table[key] = {}
        for rule in rules:
            cmp = paired_bootstrap(correct[rows_of[(rule, f)]], rnd, n_boot=n_boot)
            table[key][rule] = {"accuracy": cmp["a"]["accuracy"], "ci": cmp["a"]["ci"], "seed_std": cmp["a"]["seed_std"],
                                "minus_random": cmp["difference"], "minus_random_ci": cmp["difference_ci"],
                                "p_value": cmp["p_value"], "verdict": verdict(cmp) if rule != "random" else "baseline"}
        top = max(rules, key=lambda r: (table[key][r]["accuracy"], r == "random"))  # ties go to random
        best[key] = {"rule": top, **table[key][top]}
    suggested = next((f for f in sorted(fractions) if best[f"{f:g}"]["accuracy"] >= full_acc - tolerance), None)
    return {
        "probe": asdict(probe), "rules": rules, "fractions": list(fractions), "seeds": seeds, "n_pool": n,
        "n_test": len(ytc), "full": {"accuracy": full_acc}, "table": table, "best": best, "tolerance": tolerance,
        "suggested_budget": suggested, "n_probes": len(subsets), "seconds": round(time.perf_counter() - t0, 3),
    }


# ---- choosing a rule by evidence (`rule: auto`) -------------------------------------------------------------------


AUTO_CANDIDATES = ("hard", "easy", "ccs", "moderate", "random")


def choose_rule(
    emb: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    budget: int,
    *,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    holdout_fraction: float = 0.2,
    seeds: int = 3,
    probe: ProbeSpec = ProbeSpec(),
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Picks the selection rule for ``scores`` (higher = harder) at ``budget`` of ``len(scores)`` rows by evidence.

    The rows are split at random (``seed``) into a held-out test part (``holdout_fraction``) and a pool; every
    candidate selects the same fraction of the pool from the given scores (computed once, by the caller), a linear
    probe trains on each selection (seeded rules ``seeds`` times) and is tested on the held-out part. The rule with
    the highest mean test accuracy wins (ties go to random). Returns the evidence: the chosen rule, the kept fraction
    and the sweep table for that fraction (accuracy, CI, difference from random, p-value per rule).
    """
    n = len(scores)
    if not 0 < budget <= n:
        raise ValueError(f"budget must be in [1, {n}], got {budget}")
    test = np.random.default_rng([seed, 7919]).random(n) < holdout_fraction
    pool = np.flatnonzero(~test)
    x = np.asarray(emb, dtype=np.float32)
    fraction = budget / n
    if budget == n:
        return {"rule": "random", "kept_fraction": 1.0, "why": "keeps every row: every rule keeps the same rows"}
    pool_scores = SweepScores(emb=x[pool], el2n=np.asarray(scores, np.float64)[pool],
                              prototype=np.zeros(len(pool)), cluster=np.zeros(len(pool), np.int64),
                              centroids=np.zeros((1, x.shape[1]), np.float32))
    result = sweep(x[pool], np.asarray(labels)[pool], x[test], np.asarray(labels)[test], pool_scores,
                   rules=[r for r in candidates if r not in ("prototypes", "dbp")], fractions=[fraction], seeds=seeds,
                   probe=probe, n_boot=n_boot)
    key = f"{fraction:g}"
    best = result["best"][key]
    return {
        "rule": best["rule"], "kept_fraction": fraction, "n_pool": len(pool), "n_test": int(test.sum()),
        "holdout_fraction": holdout_fraction, "probe": result["probe"], "seeds": seeds,
        "table": result["table"][key], "full_accuracy": result["full"]["accuracy"],
        "why": (f"{best['rule']} had the highest held-out probe accuracy at {fraction:.3g} kept "
                f"({100 * best['accuracy']:.2f}%; random {100 * result['table'][key]['random']['accuracy']:.2f}%)"),
        "seconds": result["seconds"],
    }


def auto_rule(ctx: Any, scores: np.ndarray, budget: int) -> dict[str, Any]:
    """`rule: auto` for a curate step: :func:`choose_rule` on the alive rows of a ScoringContext (scorers/step.py),
    cached as JSON under ``ctx.cache_dir`` (one folder per store fingerprint) keyed by a hash of the rows, their
    labels, the scores and the budget, so a rerun on the same store reuses the evidence. Returns the evidence with
    ``cached`` (whether it came from the cache)."""
    import json

    from pipeline.atomic import atomic_write_text

    rows = np.flatnonzero(ctx.alive)
    if ctx.labels is None:
        raise ValueError("rule: auto trains probes on labels; the source has none (pick a rule, e.g. rule: ccs)")
    labels = np.asarray(ctx.labels[rows])
    s = np.asarray(scores, dtype=np.float64)[rows]
    digest = hashlib.sha1()
    for part in (rows.astype(np.int64).tobytes(), s.tobytes(), "\0".join(map(str, labels)).encode(),
                 f"{budget}|{ctx.seed}|{AUTO_CANDIDATES}|{ProbeSpec()}".encode()):
        digest.update(part)
    path = Path(ctx.cache_dir) / f"auto-rule-{digest.hexdigest()[:16]}.json" if ctx.cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return {**json.loads(path.read_text()), "cached": True}
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged cache file is recomputed and replaced
    evidence = choose_rule(np.asarray(ctx.emb[rows], dtype=np.float32), labels, s, budget, seed=ctx.seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(evidence, default=float))
    return {**evidence, "cached": False}


# ---- a finished run -------------------------------------------------------------------------------------------------


def load_run_rows(run_dir: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A finished run's scored rows: (run.json, unit embeddings float32 [n, d], uids, labels, keep), in store order.

    Rows the manifest marks bad_input are not in the store's ok rows and are left out.
    """
    import polars as pl

    from pipeline.manifest import read_manifest, read_run_info
    from pipeline.store import EmbeddingStore

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    store_path = Path(info.get("store", {}).get("path", run_dir / "store"))
    if not store_path.exists():
        raise FileNotFoundError(f"the run's embedding store {store_path} is gone; evaluate needs its embeddings")
    x, meta = EmbeddingStore(store_path).load(dtype="float32")
    meta = meta.select("uid", "label")
    manifest = read_manifest(run_dir).select("uid", "keep")
    joined = meta.with_row_index("row").join(manifest, on="uid", how="left").sort("row")
    if joined["keep"].null_count():
        missing = joined.filter(pl.col("keep").is_null())["uid"].head(3).to_list()
        raise ValueError(f"the manifest of {run_dir} lacks store rows (e.g. {missing}); was the store rebuilt after the run?")
    if joined["label"].null_count():
        raise ValueError("evaluate trains classifiers: the run's source has no labels for "
                         f"{joined['label'].null_count()} rows (image_folder class subfolders, or a label column)")
    return (info, x, joined["uid"].to_numpy().astype(object), joined["label"].to_numpy().astype(object),
            joined["keep"].to_numpy().astype(bool))


def evaluate_run(run_dir: str | Path, settings: EvaluateConfig | None = None, *, write: bool = True) -> dict[str, Any]:
    """Measures a finished run's selection against random (and with ``settings.sweep`` every rule at every fraction)
    on the run's own embeddings; adds the result to run.json as ``evaluation`` when ``write``.

    The test rows are the uid-hash held-out split, or ``settings.eval_source`` embedded with the run's embedder
    (kept in <run_dir>/eval/store, resumable).
    """
    from pipeline.atomic import atomic_write_text
    from pipeline.manifest import RUN_FILE, _json_default

    from pipeline.config import EvaluateConfig

    settings = settings or EvaluateConfig()
    t0 = time.perf_counter()
    info, x, uids, labels, keep = load_run_rows(run_dir)
    if settings.eval_source is None:
        test = holdout_mask(uids, settings.holdout_fraction)
        x_test, y_test = x[test], labels[test]
        split = {"kind": "uid_hash", "holdout_fraction": settings.holdout_fraction, "salt": HOLDOUT_SALT}
    else:
        test = np.zeros(len(uids), dtype=bool)
        x_test, y_test = embed_eval_source(info, run_dir, settings.eval_source)
        split = {"kind": "eval_source", "source": settings.eval_source.arguments(), "rows": len(y_test)}
    pool = ~test
    if keep[pool].sum() == 0:
        raise ValueError("the run keeps no row outside the held-out split: nothing to evaluate")
    if len(np.unique(labels[pool].astype(str))) < 2:
        raise ValueError("evaluate needs at least 2 classes among the pool's labels")
    probe = ProbeSpec(kind=settings.probe, l2=settings.l2, max_iter=settings.probe_iterations)
    result: dict[str, Any] = {"split": split, "n_rows": len(uids), "kept_fraction": float(keep.mean())}
    result["selection_vs_random"] = evaluate_selection(x[pool], labels[pool], keep[pool], x_test, y_test,
                                                       seeds=settings.seeds, probe=probe)
    if settings.sweep:
        scores = sweep_scores(x[pool], labels[pool], seed=0)
        result["sweep"] = sweep(x[pool], labels[pool], x_test, y_test, scores, rules=settings.rules,
                                fractions=settings.fractions, seeds=min(settings.seeds, 3), probe=probe,
                                tolerance=settings.tolerance)
        result["sweep"]["scores"] = scores.info
    result["settings"] = settings.model_dump(mode="json")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if write:
        import json

        info["evaluation"] = result
        atomic_write_text((Path(run_dir) / RUN_FILE).resolve(), json.dumps(info, indent=2, sort_keys=True, default=_json_default))
    return result


def embed_eval_source(info: dict[str, Any], run_dir: str | Path, spec: SourceConfig) -> tuple[np.ndarray, np.ndarray]:
    """A labelled eval source embedded exactly like the run (same model; the pixels embedder's fitted state from the
    run's store) into <run_dir>/eval/store; returns its ok rows' (embeddings float32, labels)."""
    from pipeline import fill_store
    from pipeline.ingest import plan_ingest
    from pipeline.config import CurateConfig
    from pipeline.store import EmbeddingStore

    cfg = CurateConfig.model_validate(info["config"])
    sub = cfg.model_copy(update={"source": spec, "store_dir": Path(run_dir) / "eval" / "store"})
    if (spec.kind == "precomputed") != (cfg.embed.kind == "precomputed"):
        raise ValueError("eval_source: precomputed embeddings go with a precomputed run, image sources with an image run")
    plan = plan_ingest(sub)
    if spec.kind == "precomputed":
        store = fill_store.ingest_precomputed(sub, plan)
    else:
        embedder = fill_store.make_embedder(cfg, None, EmbeddingStore(info["store"]["path"]))
        store = fill_store.init_store(sub, plan, embedder, embedder.dim)
        increment, jobs = fill_store.image_jobs(sub, plan, store)  # only new or changed samples (pipeline.changes)
        for job in jobs:
            fill_store.embed_shard(sub, plan.source, job.pop("refs"), store.root, embedder=embedder, **job)
        fill_store.commit_increment(store, increment)
    x, meta = store.load(dtype="float32")
    if meta["label"].null_count() or len(meta) == 0:
        raise ValueError(f"eval_source {spec.arguments()} needs labelled, decodable samples")
    return x, meta["label"].to_numpy().astype(object)


def format_evaluation(result: dict[str, Any]) -> str:
    """The human summary of an evaluation: selection vs random (and the sweep's table and recommendation)."""
    s = result["selection_vs_random"]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    ci = lambda c: f"[{pct(c[0])}, {pct(c[1])}]"  # noqa: E731
    lines = [f"evaluation ({s['probe']['kind']} probe on the run's embeddings; test: {result['split']['kind']}, "
             f"{s['n_test']} rows; pool {s['n_pool']} rows, {s['n_kept_in_pool']} kept)"]
    lines.append(f"  selection  {pct(s['selection']['accuracy'])}%  CI {ci(s['selection']['ci'])}")
    lines.append(f"  random     {pct(s['random']['accuracy'])}%  CI {ci(s['random']['ci'])}  "
                 f"(seed std {pct(s['random']['seed_std'])} pp, {s['seeds']} seeds)")
    if "full" in s:
        lines.append(f"  full pool  {pct(s['full']['accuracy'])}%  CI {ci(s['full']['ci'])}")
    lines.append(f"  selection − random: {100 * s['difference']:+.2f} pp  CI {ci(s['difference_ci'])} pp, "
                 f"p = {s['p_value']:.3g}: {s['verdict']}")
    sw = result.get("sweep")
    if sw:
        rules = sw["rules"]
        lines.append(f"  sweep (full pool {pct(sw['full']['accuracy'])}%), probe accuracy % by rule and kept fraction:")
        lines.append("    " + "kept".ljust(7) + "".join(r.rjust(11) for r in rules) + "   best (− random, p)")
        for key, row in sw["table"].items():
            b = sw["best"][key]
            lines.append("    " + f"{100 * float(key):g}%".ljust(7) + "".join(pct(row[r]["accuracy"]).rjust(11) for r in rules)
                         + f"   {b['rule']} ({100 * b['minus_random']:+.2f} pp, p = {b['p_value']:.2g})")
        budget = sw["suggested_budget"]
        lines.append(f"  suggested budget: {'none of the fractions' if budget is None else f'{100 * budget:g}% kept'} "
                     f"(smallest fraction within {100 * sw['tolerance']:g} pp of the full pool)")
    lines.append(f"  time: {result['seconds']:.1f}s")
    return "\n".join(lines)
