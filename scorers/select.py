"""One selector for every scorer: turn per-sample scores into a keep mask of an exact size.

Scores are oriented **higher = harder / more worth keeping under a keep-hardest rule** (the package
convention; negate scores that are oriented the other way, e.g. ``-aum``).

Rules (``rule=``):

- ``"hard"``: keep the ``k`` highest scores (Paul et al. 2021; Sorscher et al. 2022 when data is abundant).
- ``"easy"``: keep the ``k`` lowest scores (Sorscher et al. 2022 when data is scarce).
- ``"window"``: offset window (Paul et al. 2021, Fig. 4): skip the ``offset`` hardest fraction, keep the next
  ``k``; the window slides back when it would run off the easy end. Knob: ``offset`` (required, in [0, 1)).
- ``"ccs"``: Coverage-centric Coreset Selection (Zheng et al., ICLR 2023; reference code
  haizhongzheng/Coverage-centric-coreset-selection): drop the ``beta·N`` hardest (by ``cut_scores``, default
  ``scores``; the paper cuts by AUM — pass ``cut_scores=-aum``), split the remaining score range into
  ``n_bins`` (50) equal-width bins, visit bins from least to most populated giving each
  ``min(population, ⌊budget left / bins left⌋)``, and sample uniformly inside each bin. Knobs: ``beta``
  (default :func:`ccs_default_beta`), ``n_bins``, ``cut_scores``.
- ``"moderate"``: Moderate coreset (Xia et al., ICLR 2023; tmlr-group/Moderate-DS): with
  ``embeddings=`` the score is the Euclidean distance to the class's element-wise median embedding;
  keep the middle band of the ranking (the ``k`` samples around the median rank, as the reference code
  does). Without embeddings it keeps the middle band of ``scores`` (the paper's "any score" variant).
- ``"random"``: uniform without replacement.
- ``"heuristic"``: ``"hard"`` when the kept fraction ≥ ``HEURISTIC_HARD_MIN_KEEP`` (0.7), else ``"ccs"``. Why: keeping
  the hardest beats random at low pruning rates (Paul et al.: EL2N at 50% pruned CIFAR-10 95.2 vs random 93.5),
  but collapses below random at high pruning rates (Zheng et al.: forgetting at 90% pruned CIFAR-10 34% vs
  random ~79%), where CCS beats random (+7 pp at 90% pruned) and matches the score-based methods at 30–50%.
  0.7 kept (30% pruned) is the highest pruning rate at which every score-based method in Zheng et al.'s
  CIFAR-10 table still beat random; below it the choice goes to the rule that is safe at every rate. A fixed
  guess: the steps' ``rule: auto`` chooses by evidence instead (pipeline/evaluate.py ``choose_rule``).

Class balance (``class_balanced=True``, the default when ``labels`` are given): the budget is split over
classes in proportion to their sizes with largest-remainder rounding (exact total) and the rule runs
inside each class. Every rule keeps exactly the budget. Ties are broken by row index (lower index first);
randomness comes only from ``seed``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from scorers.arrays import encode_labels

__all__ = [
    "Selection",
    "select",
    "RULES",
    "Rule",
    "HEURISTIC_HARD_MIN_KEEP",
    "ccs_default_beta",
    "class_median_distance",
    "proportional_budgets",
]

Rule = Literal["heuristic", "hard", "easy", "window", "ccs", "moderate", "random"]
RULES: tuple[str, ...] = get_args(Rule)
HEURISTIC_HARD_MIN_KEEP = 0.7
CCS_N_BINS = 50
_RULE_KNOBS: dict[str, frozenset[str]] = {
    "hard": frozenset(),
    "easy": frozenset(),
    "random": frozenset(),
    "window": frozenset({"offset"}),
    "ccs": frozenset({"beta", "n_bins", "cut_scores"}),
    "moderate": frozenset({"embeddings"}),
}
_RULE_KNOBS["heuristic"] = _RULE_KNOBS["hard"] | _RULE_KNOBS["ccs"]


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select`.

    Attributes:
        keep: bool ``[n]``, exactly ``budget`` True.
        rule: the rule that ran (never ``"heuristic"``).
        why: one sentence for ``run.json``: the rule, why it was chosen, its settings.
        info: JSON-serialisable details (budget, per-class budgets, knobs used, counts cut).
    """

    keep: np.ndarray
    rule: str
    why: str
    info: dict[str, Any] = field(default_factory=dict)


def ccs_default_beta(keep_fraction: float) -> float:
    """Default CCS hard-cut rate β (fraction of *all* samples dropped from the hard end) for a kept fraction.

    Step table after the CCS paper's CIFAR-10 settings, where β was grid-searched per pruning rate: no cut at
    ≤ 50% pruned, 10% at 70–80% pruned, 30% at 90% pruned (the repository's README runs 90% pruned with
    ``--mis-ratio 0.3``). Treat it as a heuristic for other datasets; noisier data wants a larger β.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if keep_fraction >= 0.5:
        return 0.0
    if keep_fraction >= 0.15:
        return 0.1
    return 0.3


def proportional_budgets(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over groups in proportion to ``sizes`` with largest-remainder rounding.

    The result sums to ``total`` exactly and never exceeds a group's size (requires ``total ≤ sum(sizes)``).
    Equal remainders go to the earlier group.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    if not 0 <= total <= n:
        raise ValueError(f"total must be in [0, {n}], got {total}")
    if n == 0:
        return np.zeros_like(sizes)
    exact = sizes * total  # compare remainders exactly with integers: share_c = sizes_c * total / n
    base = exact // n
    remainder = exact - base * n
    short = total - int(base.sum())
    order = np.lexsort((np.arange(sizes.shape[0]), -remainder))
    base[order[:short]] += 1
    return base


def class_median_distance(embeddings: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance of each row to its class's element-wise median embedding (Moderate, Xia et al. 2023).

    With ``labels=None`` all rows form one class. Returns float64 ``[n]``; higher = farther from the
    class's centre (more atypical).
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [n, d], got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf")
    n = emb.shape[0]
    codes = np.zeros(n, dtype=np.int64) if labels is None else encode_labels(labels, n)[0]
    out = np.empty(n, dtype=np.float64)
    for rows in _groups(codes):
        if rows.shape[0] == 0:
            continue
        block = emb[rows].astype(np.float64)
        out[rows] = np.linalg.norm(block - np.median(block, axis=0), axis=1)
    return out




def _groups(codes: np.ndarray, n_groups: int | None = None) -> list[np.ndarray]:
    """Row indices of each code ``0..n_groups-1`` (ascending within a group), in one sort."""
    n_groups = int(codes.max()) + 1 if n_groups is None and codes.shape[0] else (n_groups or 0)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=n_groups))
    return np.split(order, bounds[:-1]) if n_groups else []


def _finite_1d(name: str, arr: Any, n: int | None) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf values (first at row {int(np.argmax(bad))})")
    return a


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# --- rules, each run on one group (a class, or everything): rows `idx` (sorted), returns kept rows ----


def _hard(idx: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    return idx[np.lexsort((idx, -s))[:k]]


def _easy(idx: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    return idx[np.lexsort((idx, s))[:k]]


def _window(idx: np.ndarray, s: np.ndarray, k: int, offset: float) -> tuple[np.ndarray, int]:
    n = idx.shape[0]
    start = min(_round_half_up(offset * n), n - k)  # slide back rather than run off the easy end
    return idx[np.lexsort((idx, -s))[start:start + k]], start


def _moderate(idx: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    n = idx.shape[0]
    low = (n - k) // 2
    return idx[np.lexsort((idx, s))[low:low + k]]


def _random(idx: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return idx[rng.permutation(idx.shape[0])[:k]]


def _ccs_bin_budgets(populations: np.ndarray, budget: int) -> np.ndarray:
    """CCS allocation: least-populated bin first, each ``min(pop, ⌊left / bins left⌋)``; exact when
    ``budget ≤ sum(populations)`` (a bin capped by the floor leaves at most (bins left − 1)·(share + 1)
    for the rest, which the larger bins behind it can hold)."""
    order = np.argsort(populations, kind="stable")
    out = np.zeros_like(populations)
    left = budget
    for i, b in enumerate(order):
        take = min(int(populations[b]), left // (populations.shape[0] - i))
        out[b] = take
        left -= take
    assert left == 0, "CCS allocation must be exact when the budget fits"
    return out


def _ccs(
    idx: np.ndarray, s: np.ndarray, cut: np.ndarray, k: int, beta: float, n_bins: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    n = idx.shape[0]
    n_cut = min(_round_half_up(beta * n), n - k)
    rest = np.sort(np.lexsort((idx, -cut))[n_cut:])  # positions left after dropping the hardest
    if k == 0 or rest.shape[0] == 0:
        return idx[:0], n_cut
    sr = s[rest]
    lo, hi = float(sr.min()), float(sr.max())
    if hi > lo:
        bins = np.minimum(((sr - lo) / (hi - lo) * n_bins).astype(np.int64), n_bins - 1)
    else:
        bins = np.zeros(sr.shape[0], dtype=np.int64)
    budgets = _ccs_bin_budgets(np.bincount(bins, minlength=n_bins), k)
    kept = []
    for b in np.flatnonzero(budgets):
        members = rest[bins == b]
        kept.append(members[rng.choice(members.shape[0], size=int(budgets[b]), replace=False)])
    return idx[np.concatenate(kept)], n_cut


def select(
    scores: np.ndarray | None,
    *,
    keep_fraction: float | None = None,
    budget: int | None = None,
    rule: str = "heuristic",
    labels: np.ndarray | None = None,
    class_balanced: bool = True,
    seed: int = 0,
    **rule_knobs: Any,
) -> Selection:
    """Select exactly ``budget`` rows (or ``round(keep_fraction·n)``) by ``rule``; see the module docstring.

    Args:
        scores: ``[n]`` finite floats, higher = harder. May be None for ``"random"`` and for ``"moderate"``
            with ``embeddings``.
        keep_fraction: in (0, 1]; exactly one of ``keep_fraction`` / ``budget``. Rounded half up.
        budget: number of rows to keep, in [0, n].
        rule: one of :data:`RULES`.
        labels: ``[n]`` class labels (ints or strings) for class balance and Moderate's class medians.
        class_balanced: split the budget over classes in proportion to class sizes (largest remainder)
            and apply the rule per class. Ignored (and said so in ``why``) without labels.
        seed: for the random parts (CCS within-bin sampling, random).
        **rule_knobs: ``offset`` (window), ``beta``, ``n_bins``, ``cut_scores`` (ccs), ``embeddings`` (moderate).

    Returns:
        :class:`Selection` with ``keep.sum() == budget``.

    Raises:
        ValueError: bad fraction/budget, unknown rule or knob, NaN/inf scores, shape mismatches.
    """
    if rule == "auto":
        raise ValueError("rule 'auto' chooses by evidence in a curate step (pipeline/evaluate.py choose_rule); "
                         "here pass a rule, or 'heuristic' for the fixed hard/CCS switch")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    unknown = set(rule_knobs) - _RULE_KNOBS[rule]
    if unknown:
        raise ValueError(
            f"knob(s) {sorted(unknown)} do not apply to rule {rule!r} (it takes {sorted(_RULE_KNOBS[rule]) or 'none'})"
        )

    embeddings = rule_knobs.get("embeddings")
    n_from = [np.shape(a)[0] for a in (scores, labels, embeddings) if a is not None and np.ndim(a) >= 1]
    if scores is None and not n_from:
        raise ValueError("scores are required (or labels/embeddings to size a random or moderate selection)")
    n = n_from[0]
    if scores is None:
        if rule not in ("random", "moderate") or (rule == "moderate" and embeddings is None):
            raise ValueError(f"rule {rule!r} needs scores")
        s = np.zeros(n, dtype=np.float64)
    else:
        s = _finite_1d("scores", scores, None)
        n = s.shape[0]

    if (keep_fraction is None) == (budget is None):
        raise ValueError("give exactly one of keep_fraction or budget")
    if keep_fraction is not None:
        if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) \
                or not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
        k_total = _round_half_up(keep_fraction * n)
    else:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise ValueError(f"budget must be an integer, got {budget!r}")
        if not 0 <= budget <= n:
            raise ValueError(f"budget must be in [0, n={n}], got {budget}")
        k_total = int(budget)
    frac = k_total / n if n else 1.0

    codes: np.ndarray | None = None
    classes: np.ndarray | None = None
    if labels is not None:
        codes, classes = encode_labels(labels, n)

    # Resolve "heuristic".
    resolved = rule
    auto_note = ""
    if rule == "heuristic":
        resolved = "hard" if frac >= HEURISTIC_HARD_MIN_KEEP else "ccs"
        cmp = ">=" if resolved == "hard" else "<"
        auto_note = (
            f"heuristic: kept fraction {frac:.3g} {cmp} {HEURISTIC_HARD_MIN_KEEP} -> {resolved} "
            + ("(keep-hardest beats random at low pruning rates, Paul et al. 2021)" if resolved == "hard" else
               "(keep-hardest falls below random at high pruning rates; CCS keeps coverage, Zheng et al. 2023)")
        )
        ignored = sorted(set(rule_knobs) - _RULE_KNOBS[resolved])
        rule_knobs = {k: v for k, v in rule_knobs.items() if k in _RULE_KNOBS[resolved]}

    info: dict[str, Any] = {"n": n, "budget": k_total, "keep_fraction": frac, "seed": seed}
    if rule == "heuristic":
        info["heuristic"] = {"resolved": resolved, "hard_min_keep": HEURISTIC_HARD_MIN_KEEP, "ignored_knobs": ignored}
    details = ""
    order_scores = s
    cut_scores = s
    offset = beta = None
    n_bins = CCS_N_BINS
    if resolved == "window":
        if "offset" not in rule_knobs:
            raise ValueError("rule 'window' needs offset= (fraction of hardest samples to skip, in [0, 1))")
        offset = float(rule_knobs["offset"])
        if not 0 <= offset < 1:
            raise ValueError(f"offset must be in [0, 1), got {offset}")
        info["offset"] = offset
    elif resolved == "ccs":
        beta = float(rule_knobs.get("beta", ccs_default_beta(frac) if frac > 0 else 0.0))
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        n_bins = rule_knobs.get("n_bins", CCS_N_BINS)
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        n_bins = int(n_bins)
        if rule_knobs.get("cut_scores") is not None:
            cut_scores = _finite_1d("cut_scores", rule_knobs["cut_scores"], n)
        info.update(beta=beta, n_bins=n_bins, cut_by="cut_scores" if cut_scores is not s else "scores")
    elif resolved == "moderate":
        if embeddings is not None:
            emb = np.asarray(embeddings)
            if emb.ndim != 2 or emb.shape[0] != n:
                raise ValueError(f"embeddings must be [n={n}, d], got shape {emb.shape}")
            order_scores = class_median_distance(emb, codes)
            info["moderate_score"] = "distance to class median embedding" if codes is not None else \
                "distance to median embedding"
        else:
            info["moderate_score"] = "scores"

    # Groups: classes when balancing, else everything.
    balanced = class_balanced and codes is not None
    if balanced:
        assert codes is not None and classes is not None
        sizes = np.bincount(codes, minlength=classes.shape[0])
        group_budgets = proportional_budgets(sizes, k_total)
        groups = _groups(codes, classes.shape[0])
        info["class_budgets"] = {str(classes[c]): int(group_budgets[c]) for c in range(classes.shape[0])}
    else:
        groups = [np.arange(n)]
        group_budgets = np.array([k_total])

    keep = np.zeros(n, dtype=bool)
    n_cut_total = 0
    window_slid = False
    for g, (idx, k) in enumerate(zip(groups, group_budgets)):
        k = int(k)
        if idx.shape[0] == 0:
            continue
        rng = np.random.default_rng([seed, g])
        sg = order_scores[idx]
        if resolved == "hard":
            kept = _hard(idx, sg, k)
        elif resolved == "easy":
            kept = _easy(idx, sg, k)
        elif resolved == "window":
            assert offset is not None
            kept, start = _window(idx, sg, k, offset)
            window_slid |= start < _round_half_up(offset * idx.shape[0])
        elif resolved == "ccs":
            assert beta is not None
            kept, n_cut = _ccs(idx, sg, cut_scores[idx], k, beta, n_bins, rng)
            n_cut_total += n_cut
        elif resolved == "moderate":
            kept = _moderate(idx, sg, k)
        else:
            kept = _random(idx, k, rng)
        keep[kept] = True

    if int(keep.sum()) != k_total:  # every rule above is exact; this guards future edits
        raise AssertionError(f"selection kept {int(keep.sum())} rows, budget {k_total}")

    if resolved == "window":
        details = f"skipped the {offset:.3g} hardest fraction, kept the next {k_total}"
        if window_slid:
            details += " (window slid back to fit the easy end)"
    elif resolved == "ccs":
        info["n_cut"] = n_cut_total
        details = (f"dropped the {n_cut_total} hardest (beta={beta:.3g}"
                   f"{', by cut_scores' if cut_scores is not s else ''}), "
                   f"{n_bins} equal-width score bins, least-populated first, uniform within bins")
    elif resolved == "moderate":
        details = f"middle band of {info['moderate_score']}"
    elif resolved == "hard":
        details = "highest scores kept"
    elif resolved == "easy":
        details = "lowest scores kept"
    else:
        details = "uniform without replacement"
    if balanced:
        balance = f"class-balanced over {len(groups)} classes (largest-remainder budgets)"
    elif class_balanced:
        balance = "not class-balanced (no labels)"
    else:
        balance = "not class-balanced"
    why = f"{resolved}: {details}; {balance}; kept {k_total} of {n} (seed {seed})"
    if auto_note:
        why = f"{auto_note}; {why}"
    info["class_balanced"] = balanced
    return Selection(keep=keep, rule=resolved, why=why, info=info)
