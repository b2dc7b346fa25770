"""Scoring steps: the protocol between a curate run and the scorers, and the registry that lists them.

A run's `steps` are applied in order to the rows still kept. Each step gets a ScoringContext (embeddings, uid ranks,
labels, concept clusters, the mask of rows still alive, ...) and returns a StepOutput: score columns for the manifest,
the rows it drops (the manifest gives them the step's reason), optional dup_of, weights, and notes for run.json.
Budgets (`keep_fraction`) are fractions of all scorable rows, so "semdedup, then dbp keep_fraction 0.5" keeps half of
the dataset, not half of what dedup left.

How to add a scorer (one file, plus its test):

1. Write scorers/<name>.py: pure functions, arrays in and scores out, keyword-only knobs, a docstring with the method,
   the source paper and the score's orientation. Import nothing from pipeline/ or flows/ (tests/test_layers.py checks).
   Config validation imports the file, so bind torch and faiss with `torch = lazy_module("torch")` (scorers/lazy.py),
   not `import torch` (tests/flows/test_cli_first_use.py checks that a knob typo imports neither).
2. At the bottom of that file, the step adapter, declared with @step:

       @step("my_scorer", reason="my_scorer", needs=("labels",),
             scores=(Score("score_my_scorer", higher="harder", hardness=1),),
             orientation="score_my_scorer: ...; higher = harder", exactly_one=(("keep_fraction", "threshold"),))
       def step_my_scorer(ctx: ScoringContext, *, keep_fraction: Fraction | None = None,
                          threshold: float | None = None, k: Count = 5, keep: Literal["hard", "easy"] = "hard") -> StepOutput:
           ...

   The keyword-only parameters are the step's config knobs: a parameter without a default is required, and the
   annotation is the knob's type and range, checked when the config loads (Fraction, Count, NonNegative, Positive,
   Between(lo, hi), SourceMapping, Literal[...] for choices, or any pydantic-understood Annotated type).
3. Add the scorer's row to README.md's scorer table (tests/scorers/test_registry.py checks the table against the registry)
   and write tests/scorers/test_<name>.py.

Nothing else: registry() imports every module of the scorers package whose source holds `@step(`, so a new file's
steps reach config validation (knobs, closest-name suggestions, exactly-one groups, types and ranges), the labels check
before embedding, the manifest validator (the step's reason), run.json (its orientation) and the report (its score
columns).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import math
import pkgutil
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

from scorers.select import select

__all__ = [
    "Between", "Count", "EvalSet", "Fraction", "NonNegative", "NonNegativeInt", "Positive", "Score", "ScoringContext", "SourceMapping",
    "StepOutput", "StepSpec", "alive_rows", "alive_view", "drop_by_score", "budget_for", "needing", "registry", "require_labels", "rule_knobs", "scatter",
    "select_among_alive", "step", "target_key", "validate_steps", "NEEDS",
]

# ---- knob types (use them in a step's keyword-only signature) ------------------------------------------------------


@dataclass(frozen=True)
class Describe:
    """Annotated metadata: how a knob's accepted values read in an error message (overrides the derived text)."""

    text: str


def _source_mapping(value: dict[str, Any]) -> dict[str, Any]:
    if "kind" not in value:
        raise ValueError("a source mapping needs a kind")
    return value


def Between(low: float, high: float) -> Any:  # noqa: N802 - reads as a type in a signature
    """A finite number in [low, high]."""
    return Annotated[float, Field(ge=low, le=high)]


Fraction = Annotated[float, Field(gt=0, le=1)]  # a share of rows, in (0, 1]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
SourceMapping = Annotated[dict[str, Any], AfterValidator(_source_mapping),
                          Describe("a source mapping such as {kind: image_folder, root: ...}")]

# What a step can need from the run besides embeddings and clusters.
NEEDS = frozenset({"labels", "targets", "sha1", "captions"})


# ---- the protocol ---------------------------------------------------------------------------------------------------


class Clusters(Protocol):
    centroids: np.ndarray  # k × d, unit rows
    assignment: np.ndarray  # n int: each row's cluster


FanOut = Callable[[Callable[..., Any], list[dict[str, Any]]], list[Any]]


@dataclass
class ScoringContext:
    emb: Any  # n × d unit rows (float16/32): an array, or a lazy row view over the store (has .subset(rows))
    uids: np.ndarray  # n int64: each row's uid rank in string order (sorts like the uids; the tie-break). Strings work too.
    labels: np.ndarray | None  # n str (object), None when the source has no labels
    sha1: np.ndarray | None  # n str (object): content hashes, filled when a step needs "sha1"
    kmeans: Clusters  # the run's concept clusters
    alive: np.ndarray  # n bool: rows no earlier step dropped
    n_scorable: int
    seed: int = 0
    device: str = "auto"
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # embedded target sets, by target_key(source mapping)
    fan_out: FanOut | None = None  # runs per-cluster work as tasks on the run's task runner; None = in this process
    cluster_batches: int = 1  # how many batches of clusters fan_out gets
    captions: np.ndarray | None = None  # n str (object) or None: filled when a step needs "captions"
    cache_dir: Path | None = None  # for artefacts derived from this store's rows (rule: auto's evidence); None = no cache
    # rule: auto — picks a selection rule by evidence: (ctx, scores, budget) -> evidence with the chosen "rule". The pipeline
    # sets pipeline.evaluate.auto_rule (held-out probes); None = rule: auto is not available.
    choose_rule: Callable[[ScoringContext, np.ndarray, int], dict[str, Any]] | None = None
    # Per-row store meta of the scored rows, in row order (quality statistics, captions, sha1): names → arrays.
    meta: Callable[[list[str]], dict[str, np.ndarray]] | None = None
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # embedded eval sources (leak), by target_key
    text_encoder: Callable[..., np.ndarray] | None = None  # texts → unit embeddings from the run's CLIP text tower
    # the caption embeddings the source shipped (LAION text_emb/, DataComp .npz, a table's text_embedding_column),
    # row-aligned with emb, zero rows = no caption; returns None when it ships none
    source_text: Callable[[], np.ndarray | None] | None = None
    embedder: dict[str, Any] | None = None  # the store's embedder description (store.json)
    # (embeddings, seed) → (a FAISS kNN index over them, its description): the pipeline's index choice (exact or IVF by
    # size); None = the scorer builds an exact one
    knn_index: Callable[[Any, int], tuple[Any, dict[str, Any]]] | None = None
    # append mode: DBP's per-cluster complexity as the previous version stored it (k,), NaN where it has none; the new
    # rows' quotas follow the whole dataset's concepts, not the few new rows' own spread. None = compute from the rows.
    prior_complexity: np.ndarray | None = None

    def meta_columns(self, names: list[str]) -> dict[str, np.ndarray]:
        if self.meta is None:
            raise ValueError(f"this run gives its steps no store meta (needed: {names})")
        return self.meta(names)

    def encode_text(self, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
        if self.text_encoder is None:
            raise ValueError("this step needs the CLIP text tower: embed with embed.kind: clip "
                             "(clip_score can instead read caption embeddings the source ships: text_emb_paths, text_embedding_column)")
        return self.text_encoder(texts, batch_size=batch_size)

    def embedder_name(self) -> str:
        """The store's embedder as "model/pretrained" (a checkpoint file's name when it has one; "pixels" for the pixels
        embedder)."""
        e = self.embedder or {}
        if e.get("kind") != "clip" or "model" not in e:
            return str(e.get("kind", "unknown"))  # pixels, precomputed
        weights = e.get("pretrained") or (Path(e["checkpoint"]).name if e.get("checkpoint") else "random")
        return f"{e['model']}/{weights}"


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
class Score:
    """A score column a step writes: what a higher value means, whether higher is harder (1), easier (-1) or
    neither (0; used by the report to rank difficulty), and whether it may hold NaN (rows not scored)."""

    name: str  # may name a knob in braces, e.g. "score_{name}": the column is then named by that knob's value
    higher: str
    hardness: int = 0
    nullable: bool = True


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: StepFn
    reason: str | None  # the manifest reason of the rows it drops; None = it never drops
    scores: tuple[Score, ...]
    orientation: str  # one line for run.json
    needs: frozenset[str]
    exactly_one: tuple[tuple[str, ...], ...]
    knobs: dict[str, inspect.Parameter]  # the keyword-only parameters, by name
    renamed: dict[str, str] = field(default_factory=dict)  # old knob name → the one-line hint that refuses it

    @property
    def required(self) -> list[str]:
        return [k for k, p in self.knobs.items() if p.default is p.empty]

    def score_columns(self, knobs: dict[str, Any]) -> dict[str, Score]:
        """The score columns this step writes with these knobs (templates filled in), by name."""
        values = {k: p.default for k, p in self.knobs.items()} | knobs
        return {s.name.format(**values): s for s in self.scores}

    def knob_type(self, knob: str) -> Any:
        return typing.get_type_hints(self.fn, include_extras=True).get(knob, Any)


_REGISTRY: dict[str, StepSpec] = {}


def step(
    name: str,
    *,
    reason: str | None,
    orientation: str,
    scores: Sequence[Score] = (),
    needs: Sequence[str] = (),
    exactly_one: Sequence[Sequence[str]] = (),
    renamed: dict[str, str] | None = None,
) -> Callable[[StepFn], StepFn]:
    """Registers a step adapter `fn(ctx, *, knobs...) -> StepOutput` under `name` (see the module docstring)."""

    def register(fn: StepFn) -> StepFn:
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"step {name}: the adapter takes the ScoringContext as its first positional parameter")
        extra = [p.name for p in params[1:] if p.kind is not p.KEYWORD_ONLY]
        if extra:
            raise TypeError(f"step {name}: knobs must be keyword-only (after *), not {extra}")
        unknown_needs = set(needs) - NEEDS
        if unknown_needs:
            raise ValueError(f"step {name}: unknown needs {sorted(unknown_needs)}; known: {sorted(NEEDS)}")
        knobs = {p.name: p for p in params[1:]}
        for group in exactly_one:
            missing = set(group) - set(knobs)
            if missing:
                raise ValueError(f"step {name}: exactly_one names knobs it does not take: {sorted(missing)}")
        if "targets" in needs and "target" not in knobs:
            raise ValueError(f"step {name}: a step that needs targets takes its source mapping as the knob `target`")
        spec = StepSpec(name=name, fn=fn, reason=reason, scores=tuple(scores), orientation=orientation,
                        needs=frozenset(needs), exactly_one=tuple(tuple(g) for g in exactly_one), knobs=knobs,
                        renamed=dict(renamed or {}))
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"two steps are named {name!r}: {old.fn.__module__}.{old.fn.__qualname__} and "
                             f"{fn.__module__}.{fn.__qualname__}")
        _REGISTRY[name] = spec
        fn.__step_spec__ = spec  # type: ignore[attr-defined] - lets registry() find it again after a registry reset
        return fn

    return register


def registry() -> dict[str, StepSpec]:
    """Every registered step by name. Imports each module of the scorers package that declares a step first (a
    module registers its steps when imported), so a scorer in a new file is found with no other edit."""
    import scorers

    for info in pkgutil.iter_modules(scorers.__path__):
        name = f"scorers.{info.name}"
        if not _declares_steps(name):
            continue  # config validation must not pay for helpers such as distill.py that import torch
        module = importlib.import_module(name)
        for value in vars(module).values():
            spec = getattr(value, "__step_spec__", None) if inspect.isfunction(value) else None
            if spec is not None and spec.fn is value and spec.name not in _REGISTRY:
                _REGISTRY[spec.name] = spec
    return _REGISTRY


def _declares_steps(module: str) -> bool:
    """Whether the module's source uses the @step decorator (read, not imported)."""
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    if origin is None or not origin.endswith(".py"):
        return True  # no source to read (a compiled module): import it to see
    return "@step(" in Path(origin).read_text(encoding="utf-8")


# ---- config validation ----------------------------------------------------------------------------------------------


def validate_steps(steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Checks step names and knobs before any work starts, from the registry: unknown scorers and knobs (with the
    closest name), missing required knobs, each knob's type and range (the accepted values in the message), and
    groups of knobs of which exactly one must be given (a false value counts as absent). Raises ValueError."""
    steps_by_name = registry()
    for position, (name, knobs) in enumerate(steps):
        if name not in steps_by_name:
            raise ValueError(f"step {position}: unknown scorer {name!r}{_did_you_mean(name, steps_by_name)}; known: {sorted(steps_by_name)}")
        spec = steps_by_name[name]
        where = f"step {position} ({name})"
        for old in sorted(set(knobs) & set(spec.renamed)):
            raise ValueError(f"{where}: knob {old!r} was renamed: {spec.renamed[old]}")
        unknown = sorted(set(knobs) - set(spec.knobs))
        if unknown:
            hint = _did_you_mean(unknown[0], spec.knobs)
            raise ValueError(f"{where}: unknown knobs {unknown}{hint}; accepted: {sorted(spec.knobs)}")
        missing = [k for k in spec.required if knobs.get(k) is None]
        if missing:
            raise ValueError(f"{where}: needs {', '.join(missing)}")
        for knob, value in knobs.items():
            if value is None and spec.knobs[knob].default is None:
                continue  # null = not given
            annotation = spec.knob_type(knob)
            try:
                _adapter(annotation).validate_python(value)
            except ValidationError:
                raise ValueError(f"{where}: {knob} must be {describe(annotation)}, got {value!r}") from None
        for group in spec.exactly_one:
            given = [k for k in group if knobs.get(k) not in (None, False)]
            if len(given) != 1:
                raise ValueError(f"{where}: give exactly one of {_either(group)}" + (" (got both)" if given else ""))


def needing(need: str, steps: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """Positions of the steps that need `need` (one of NEEDS)."""
    steps_by_name = registry()
    return [i for i, (name, _) in enumerate(steps) if name in steps_by_name and need in steps_by_name[name].needs]


_STRICT = ConfigDict(strict=True, allow_inf_nan=False)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    key = repr(annotation)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(annotation, config=_STRICT)
    return _ADAPTERS[key]


def describe(annotation: Any) -> str:
    """The accepted values of a knob type, for an error message: "in (0, 1]", "one of 'hard', 'easy'", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, *meta = args
        for m in meta:
            if isinstance(m, Describe):
                return m.text
        bounds = _bounds(meta)
        if bounds and base is int:
            return f"an integer {bounds}"
        if bounds and base is float:
            return bounds if bounds.startswith("in ") else f"a number {bounds}"
        return describe(base)
    if origin in (typing.Union, types.UnionType):  # None = not given: not worth saying
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Sequence, tuple):
        return f"a list of values {describe(args[0])}" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _bounds(meta: list[Any]) -> str:
    lower = upper = None
    for m in meta:
        for item in getattr(m, "metadata", [m]):  # a pydantic Field keeps its constraints in .metadata
            for attr, side in (("ge", "["), ("gt", "("), ("le", "]"), ("lt", ")")):
                value = getattr(item, attr, None)
                if value is not None:
                    if side in "[(":
                        lower = (side, value)
                    else:
                        upper = (side, value)
    if lower and upper:
        return f"in {lower[0]}{lower[1]:g}, {upper[1]:g}{upper[0]}"
    if lower:
        return f"{'≥' if lower[0] == '[' else '>'} {lower[1]:g}"
    if upper:
        return f"{'≤' if upper[0] == ']' else '<'} {upper[1]:g}"
    return ""


def _did_you_mean(word: str, names: Any) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _either(group: Sequence[str]) -> str:
    return group[0] if len(group) == 1 else ", ".join(group[:-1]) + " or " + group[-1]


# ---- helpers for step adapters --------------------------------------------------------------------------------------


def target_key(target: dict[str, Any]) -> str:
    """How a step's `target` source is named in ScoringContext.targets."""
    return json.dumps(target, sort_keys=True, default=str)


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
    budget = budget_for(ctx, keep_fraction)
    rows = np.flatnonzero(ctx.alive)
    labels = ctx.labels[rows] if ctx.labels is not None else None
    # per-row knobs (embeddings for moderate, cut_scores for CCS) follow the rows
    rule_knobs = {k: v[rows] if isinstance(v, np.ndarray) and len(v) == len(ctx.alive) else v for k, v in rule_knobs.items()}
    chosen = select(scores[rows], budget=budget, rule=rule, labels=labels, seed=ctx.seed, **rule_knobs)
    drop = np.zeros(len(ctx.alive), dtype=bool)
    drop[rows[~chosen.keep]] = True
    return drop, {"rule": chosen.rule, "why": chosen.why, "budget": budget, **chosen.info}


def alive_view(ctx: ScoringContext) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray]:
    """Rows still alive: (row indices, embeddings, cluster ids, uids)."""
    rows = np.flatnonzero(ctx.alive)
    if len(rows) == len(ctx.alive):  # nothing dropped yet: no copy of the embeddings (1 GB at 1M × 512 float16)
        return rows, ctx.emb, ctx.kmeans.assignment, ctx.uids
    emb = ctx.emb.subset(rows) if hasattr(ctx.emb, "subset") else ctx.emb[rows]  # a store view stays lazy
    return rows, emb, ctx.kmeans.assignment[rows], ctx.uids[rows]


def scatter(n: int, rows: np.ndarray, values: np.ndarray, fill: float = math.nan) -> np.ndarray:
    """An n-long float32 column with `values` at `rows` and `fill` elsewhere."""
    full = np.full(n, fill, dtype=np.float32)
    full[rows] = values
    return full


def rule_knobs(ctx: ScoringContext, rule: str, cut_scores: np.ndarray | None = None) -> dict[str, Any]:
    """The per-row inputs a selection rule takes: embeddings for moderate, cut scores for CCS (and heuristic)."""
    knobs: dict[str, Any] = {}
    if rule == "moderate":
        knobs["embeddings"] = ctx.emb
    if rule in ("ccs", "heuristic") and cut_scores is not None:
        knobs["cut_scores"] = cut_scores
    return knobs


def require_labels(ctx: ScoringContext, what: str) -> np.ndarray:
    """The context's labels, or the one-line error for a step (or mode of one) that trains on labels."""
    if ctx.labels is None:
        raise ValueError(f"{what} needs labels; the source has none (image_folder class subfolders, or a label column)")
    return ctx.labels


def alive_rows(ctx: ScoringContext) -> tuple[np.ndarray, Any]:
    """Rows still alive: (row indices, their embeddings; the context's own array when nothing was dropped)."""
    rows, emb, _, _ = alive_view(ctx)
    return rows, emb


def drop_by_score(ctx: ScoringContext, score: np.ndarray, *, keep: str, keep_fraction: float | None,
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
