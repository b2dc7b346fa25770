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
from typing import Any

import numpy as np

from pipeline.index import KMeansResult


@dataclass
class ScoringContext:
    emb: np.ndarray  # n × d float32, unit rows
    uids: np.ndarray  # n str (object)
    labels: np.ndarray | None  # n str (object) or None when the source has no labels
    sha1: np.ndarray  # n str (object)
    kmeans: KMeansResult
    alive: np.ndarray  # n bool: rows no earlier step dropped
    n_scorable: int
    seed: int = 0
    device: str = "auto"


@dataclass
class StepOutput:
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # column name → n float values (NaN where unscored)
    drop: np.ndarray | None = None  # n bool, rows this step removes (a subset of ctx.alive)
    dup_of: np.ndarray | None = None  # n int64 row index of the kept original, -1 if none
    info: dict[str, Any] = field(default_factory=dict)


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
    if "embeddings" in rule_knobs:
        rule_knobs["embeddings"] = rule_knobs["embeddings"][rows]
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


STEPS: dict[str, StepSpec] = {
    "exact_dup": StepSpec(step_exact_dup, "exact_dup", frozenset(), "drops byte-identical copies; keeps the smallest uid"),
    "random": StepSpec(
        step_random,
        "random",
        frozenset({"keep_fraction", "seed"}),
        "score_random: uniform, seeded; keeps a class-balanced random subset",
    ),
}


def register_step(name: str, spec: StepSpec) -> None:
    if name in STEPS:
        raise ValueError(f"a step named {name!r} is already registered")
    STEPS[name] = spec


def check_steps(steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Validates step names and knobs before any work starts."""
    for position, (name, knobs) in enumerate(steps):
        if name not in STEPS:
            raise ValueError(f"step {position}: unknown scorer {name!r}; known: {sorted(STEPS)}")
        unknown = set(knobs) - STEPS[name].knobs
        if unknown:
            raise ValueError(f"step {position} ({name}): unknown knobs {sorted(unknown)}; accepted: {sorted(STEPS[name].knobs)}")
        fraction = knobs.get("keep_fraction")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"step {position} ({name}): keep_fraction must be in (0, 1], got {fraction!r}")


def run_steps(ctx: ScoringContext, steps: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Applies steps in order. Returns the manifest columns for scored rows and one note per step.

    Columns: reason (None where kept), dup_of (row index or -1) and every score column.
    """
    n = len(ctx.uids)
    reason = np.full(n, None, dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    scores: dict[str, np.ndarray] = {}
    notes: list[dict[str, Any]] = []
    for name, knobs in steps:
        spec = STEPS[name]
        out = spec.fn(ctx, **knobs)
        for col, values in out.scores.items():
            if col in scores:
                raise ValueError(f"two steps write the column {col}")
            scores[col] = np.asarray(values, dtype=np.float32)
        dropped = 0
        if out.drop is not None:
            drop = out.drop & ctx.alive
            reason[drop] = spec.reason
            if out.dup_of is not None:
                dup_of[drop] = out.dup_of[drop]
            ctx.alive = ctx.alive & ~drop
            dropped = int(drop.sum())
        notes.append(
            {"scorer": name, "knobs": knobs, "dropped": dropped, "alive_after": int(ctx.alive.sum()), "orientation": spec.orientation, **out.info}
        )
    return {"reason": reason, "dup_of": dup_of, **scores}, notes
