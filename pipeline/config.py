"""The curate flow's configuration: one YAML file, validated by pydantic before any work starts.

Example (see README.md for every option):

    name: digits
    source: {kind: image_folder, root: demo_data/digits}
    embed: {kind: pixels, shard_size: 500}
    index: {k: 20}
    steps:
      - {scorer: exact_dup}
      - {scorer: random, keep_fraction: 0.5}
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from scorers.step import needing, validate_steps


def _plain_name(value: str) -> str:
    if not value or "/" in value or value.startswith("."):
        raise ValueError(f"name {value!r} must be a plain directory name")
    return value


# A run's name is its directory under output_root: nothing that could point elsewhere.
RunName = Annotated[str, AfterValidator(_plain_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(Strict):
    kind: Literal["image_folder", "webdataset", "table", "precomputed"]
    model_config = ConfigDict(extra="allow")  # the remaining keys are the source's own arguments

    def arguments(self) -> dict[str, Any]:
        return {"kind": self.kind, **(self.model_extra or {})}


class PixelsConfig(Strict):
    size: int = Field(16, ge=4, le=256)
    grey: bool = False
    dim: int = Field(64, ge=2)
    fit_samples: int = Field(2000, ge=2)


class EmbedConfig(Strict):
    kind: Literal["clip", "pixels", "precomputed"] = "clip"
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: Path | None = None  # a local weights file; overrides `pretrained`
    model_config_file: Path | None = None  # an open_clip model config JSON to register (its file stem is the model name)
    device: str = "auto"
    batch_size: int = Field(64, ge=1)
    num_workers: int | None = Field(None, ge=0)  # DataLoader decode workers; None = every available CPU
    shard_size: int = Field(10_000, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    max_side: int = Field(4096, ge=32)
    # Pixels decoded per image at most (after JPEG draft scaling); more is status too_large. None = 2 × Pillow's
    # MAX_IMAGE_PIXELS = 178,956,970. Peak memory of one decode <= 4 B × max_pixels + 8 B × max_side² + 64 MB.
    max_pixels: int | None = Field(None, ge=1)
    decode: Literal["auto", "cpu", "nvjpeg", "reference"] = "auto"  # see pipeline/embed/device_decode.py
    pixels: PixelsConfig = PixelsConfig()


class IndexConfig(Strict):
    k: int = Field(100, ge=1)
    niter: int = Field(20, ge=1)
    seed: int = 1234
    max_points_per_centroid: int = Field(256, ge=1)
    knn: bool = False  # also build a kNN index (flat or IVF by size) and save it beside the store


class RunnerConfig(Strict):
    """Where the fan-out tasks run (embedding shards, assignment shards, cluster batches, manifest parts).

    local: Prefect's thread pool in this process (`workers` threads). dask: prefect-dask's DaskTaskRunner on a new
    LocalCluster of `workers` processes, or on an existing scheduler at `address`. ray: prefect-ray's RayTaskRunner,
    local or at `address`. The fan-in stages (k-means fit, DBP quotas, OT potentials) run once in the flow.
    """

    kind: Literal["local", "dask", "ray"] = "local"
    workers: int = Field(1, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    address: str | None = None  # an existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001)
    cluster_batches: int = Field(0, ge=0)  # cluster batches per SemDeDup step; 0 = 4 per worker


class IncrementalConfig(Strict):
    """How a rerun over a grown or changed source decides (README "Curating a growing dataset on a schedule").

    recompute: every step reruns on every live row (nothing is embedded again); decisions may change and the version's
    changes.parquet says which. append: rows of the previous version keep their decisions; only new or changed rows are
    decided: assigned to the previous version's centroids, deduplicated against every live row (exact by sha1,
    SemDeDup within the cluster), then the other steps run on the new rows alone. The centroids are refitted (a
    recompute run) when `refit` is set or when the drift statistic (the new rows' mean cosine distance to their
    centroid over the same mean at fit time, minus 1) exceeds `drift_threshold`.
    """

    mode: Literal["recompute", "append"] = "recompute"
    refit: bool = False
    drift_threshold: float = Field(0.25, gt=0)


class StepConfig(Strict):
    """One scoring step. `scorer` names it; the other keys are its knobs (declared by its step in scorers/, see scorers/step.py)."""

    scorer: str
    model_config = ConfigDict(extra="allow")

    def knobs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvaluateConfig(Strict):
    """`evaluate:` measures the run's selection against random after the manifest is written (pipeline/evaluate.py)."""

    probe: Literal["linear", "mlp"] = "linear"
    seeds: int = Field(5, ge=1, le=100)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    l2: float = Field(1e-3, ge=0)
    probe_iterations: int = Field(50, ge=1, le=10_000)  # linear probe L-BFGS iterations (README: 100 costs more, same verdicts)
    sweep: bool = False  # also every rule at every fraction (scores computed once) and a recommended budget
    fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7], min_length=1)
    rules: list[Literal["hard", "easy", "ccs", "moderate", "prototypes", "dbp", "random"]] = Field(
        default_factory=lambda: ["hard", "easy", "ccs", "moderate", "prototypes", "dbp", "random"], min_length=1)
    tolerance: float = Field(0.01, ge=0, lt=1)  # suggested budget: within this accuracy (fraction) of the full pool
    eval_source: SourceConfig | None = None  # a labelled test set instead of the uid-hash held-out split


class CurateConfig(Strict):
    name: RunName = "curate"
    source: SourceConfig
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    runner: RunnerConfig = RunnerConfig()
    steps: list[StepConfig] = Field(default_factory=lambda: [StepConfig(scorer="exact_dup")])
    incremental: IncrementalConfig = IncrementalConfig()
    store_dir: Path | None = None  # default: <output_root>/<name>/store
    output_root: Path = Path("manifests/runs")
    export_uri: str | None = None  # also copy the finished manifest, report and run.json to <export_uri>/<name>/ (fsspec)
    seed: int = 0
    report: bool = True  # write report.html and a Prefect artifact at the end of the run
    evaluate: EvaluateConfig | None = None  # measure the selection against random after the run (README 'Evaluate')
    notify: str | None = None  # an Apprise URL told when a flow run fails or crashes (e.g. mailto://..., slack://...)

    @model_validator(mode="after")
    def _consistent(self) -> CurateConfig:
        if (self.source.kind == "precomputed") != (self.embed.kind == "precomputed"):
            raise ValueError("source.kind 'precomputed' goes with embed.kind 'precomputed' and only with it")
        validate_steps([(s.scorer, s.knobs()) for s in self.steps])
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.name

    @property
    def store_path(self) -> Path:
        return self.store_dir if self.store_dir is not None else self.run_dir / "store"


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message is one line naming the file and the key."""


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CurateConfig:
    """Reads a YAML config. Relative paths in the file resolve against the file's folder; `--set` values
    (overrides) against the current directory. A bad file or value is a one-line ConfigError."""
    return load_validated(CurateConfig, path, overrides)


def load_validated(model: type[BaseModel], path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """`model` validated from a YAML file with overrides; ValidationError becomes a one-line ConfigError."""
    from pydantic import ValidationError

    raw = read_yaml_mapping(path, overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config {path}: {describe_validation_error(exc, model)}") from None


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping, relative paths resolved against its folder, with `--set` overrides
    (dotted keys; a number indexes a list, e.g. steps.2.keep_fraction) applied; validation is the caller's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give the YAML file")
    data = path.read_bytes()
    try:
        if b"\x00" in data[:8192]:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text file (a YAML config is expected)") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level (key: value lines), found {type(raw).__name__}")
    resolve_relative_paths(raw, path.parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return raw


def _yaml_problem(exc: Exception) -> str:
    """A YAML parse error as 'line L, column C: problem' (PyYAML's marks are 0-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}YAML syntax error: {problem}"


# Keys of a source mapping (the config's `source`, a step's `target`) and of the config itself that hold local paths.
SOURCE_PATH_KEYS = ("root", "path", "urls", "emb_paths", "meta_paths")
CONFIG_PATH_KEYS = {"store_dir": None, "output_root": None, "embed": ("checkpoint", "model_config_file"), "data": ("root",)}


def _resolved(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolved(v, base) for v in value]
    if not isinstance(value, str) or not value or "://" in value or value.startswith(("pipe:", "~")):
        return value
    return value if Path(value).is_absolute() else str(base / value)


def resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Makes the local paths of a config mapping absolute against `base` (the config file's folder), in place.

    URLs (scheme://), `pipe:` commands and `~` paths are left as they are; so are keys the file does not set
    (defaults such as output_root stay relative to the current directory).
    """
    base = base.resolve()
    for key, inner in CONFIG_PATH_KEYS.items():
        if key not in raw:
            continue
        if inner is None:
            raw[key] = _resolved(raw[key], base)
        elif isinstance(raw[key], dict):
            for sub in inner:
                if sub in raw[key]:
                    raw[key][sub] = _resolved(raw[key][sub], base)
    sources = [raw.get("source")] + [s.get("target") for s in raw.get("steps") or [] if isinstance(s, dict)]
    for source in sources:
        if isinstance(source, dict):
            for key in SOURCE_PATH_KEYS:
                if key in source:
                    source[key] = _resolved(source[key], base)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets tree[a][b]... for 'a.b...'; a number indexes into a list (steps.2.keep_fraction)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: empty key in the dotted path")
    node: Any = tree
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth]) or "the config"
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit():
                raise ConfigError(f"--set {dotted}: {where} is a list; index it with a number (0..{len(node) - 1})")
            index = int(key)
            if not -len(node) <= index < len(node):
                raise ConfigError(f"--set {dotted}: {where} has {len(node)} entries (indexes 0..{len(node) - 1})")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"--set {dotted}: {where} is {node!r}, not a section or a list")


def describe_validation_error(exc: Any, model: type[BaseModel]) -> str:
    """pydantic's ValidationError as one line: each problem's dotted key, what is wrong, and for an unknown key
    the closest accepted one."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err.get("loc", ())]
        message = str(err.get("msg", "invalid"))
        if message.startswith(("Value error, ", "Assertion failed, ")):
            message = message.split(", ", 1)[1]
        kind = err.get("type")
        if kind == "extra_forbidden":
            message = "unknown key" + _suggest(model, err["loc"])
        elif kind == "missing":
            message = "required key is missing"
        elif "input" in err and kind not in ("value_error", "assertion_error") and not isinstance(err["input"], (dict, list)):
            message += f", got {err['input']!r}"
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    shown = parts[:3]
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(shown) + more


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> dict[str, Any] | None:
    """The fields of the (nested) model at `loc`, following model fields and list items; None when unknown."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(current)]
            current = args[0] if args else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        # unwrap Optional[...] / X | None
        args = [a for a in typing.get_args(current) if a is not type(None)]
        if typing.get_origin(current) is not list and len(args) == 1:
            current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return dict(current.model_fields)
    return None


def _suggest(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'; did you mean X?' for an unknown key: a close sibling, or the same/close key in a nested section."""
    import difflib

    key, parent = str(loc[-1]), tuple(loc[:-1])
    siblings = _fields_at(model, parent) or {}
    close = difflib.get_close_matches(key, list(siblings), n=1, cutoff=0.6)
    prefix = "".join(f"{p}." for p in parent)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    nested = {f"{name}.{sub}": sub for name in siblings for sub in (_fields_at(model, (*parent, name)) or {})}
    exact = [dotted for dotted, sub in nested.items() if sub == key]
    close = exact or difflib.get_close_matches(key, list(nested.values()), n=1, cutoff=0.75)
    if close:
        dotted = close[0] if exact else next(d for d, sub in nested.items() if sub == close[0])
        return f"; did you mean {prefix}{dotted}?"
    return f"; accepted here: {', '.join(sorted(siblings))}" if siblings else ""


# ---- checks that need the ingest plan (run after listing the source, before any embedding) ------------------------


def check_plan_size(cfg: CurateConfig, n_samples: int, *, has_labels: bool | None = None) -> None:
    """Refuses a config that cannot work on `n_samples` listed samples, before anything is embedded.

    n_samples is the number of refs the source lists (an upper bound on the rows that decode): no samples,
    index.k > n_samples, a keep_fraction that keeps no row, or a labelled scorer on a source without labels
    (has_labels False; None skips that check) are ValueErrors naming the setting.
    """
    if n_samples <= 0:
        raise ValueError(f"source {cfg.source.arguments()} has no samples")
    if cfg.index.k > n_samples:
        raise ValueError(
            f"index.k = {cfg.index.k} clusters but the source lists only {n_samples} samples; lower index.k"
        )
    needs_labels = needing("labels", [(s.scorer, s.knobs()) for s in cfg.steps])
    for position, step in enumerate(cfg.steps):
        knobs = step.knobs()
        fraction = knobs.get("keep_fraction")
        if fraction is not None and round(fraction * n_samples) < 1:
            raise ValueError(
                f"step {position} ({step.scorer}): keep_fraction {fraction} of {n_samples} samples keeps no sample"
            )
        if has_labels is False and position in needs_labels:
            raise ValueError(
                f"step {position} ({step.scorer}) needs labels; the source has none "
                "(image_folder class subfolders, or a label column)"
            )


def check_targets(cfg: CurateConfig) -> dict[str, int]:
    """Lists every step's `target` and `eval_sources` sources before any embedding; an empty or missing one is a ValueError.

    Returns the number of samples of each target, by the step's position and scorer (e.g. "1:ot_target").
    """
    from pipeline.sources import source_from_config

    counts: dict[str, int] = {}
    target_steps = set(needing("targets", [(s.scorer, s.knobs()) for s in cfg.steps]))
    for position, step in enumerate(cfg.steps):
        knobs = step.knobs()
        where = f"step {position} ({step.scorer})"
        # sources are mappings (checked when the config loaded); eval_sources a list of them (the leak step)
        specs = [("target", knobs["target"], "")] if position in target_steps and knobs.get("target") is not None else []
        specs += [("eval source", spec, f":eval{i}") for i, spec in enumerate(knobs.get("eval_sources") or [])]
        for what, spec, suffix in specs:
            try:
                n = len(source_from_config(dict(spec)).refs())
            except ValueError as exc:  # SourceError, DuplicateUidError
                raise type(exc)(f"{where}: {what} {spec}: {exc}") from exc
            if n == 0:
                raise ValueError(f"{where}: the {what} set {spec} is empty")
            counts[f"{position}:{step.scorer}{suffix}"] = n
    return counts


def check_before_embedding(cfg: CurateConfig, plan: Any) -> dict[str, int]:
    """check_plan_size, check_source_text and check_targets for an ingest plan (ingest.IngestPlan: `.n_samples`, `.has_labels`).

    Returns check_targets' counts.
    """
    check_plan_size(cfg, plan.n_samples, has_labels=plan.has_labels)
    check_source_text(cfg)  # a table's text_embedding_column of another dimension than the CLIP model's
    return check_targets(cfg)


def check_source_text(cfg: CurateConfig) -> int | None:
    """Before any embedding: a table source's ``text_embedding_column`` is read, and its dimension must equal the
    run's CLIP image embeddings (when the model config tells it). Returns the text dimension, None without the column.
    (A precomputed source's text files are checked against its image files when it is listed.)"""
    from pipeline.sources import SourceError, TableSource, source_from_config
    from pipeline.text_source import clip_embed_dim

    if cfg.source.kind != "table" or cfg.source.arguments().get("text_embedding_column") is None:
        return None
    source = source_from_config(cfg.source.arguments())
    assert isinstance(source, TableSource)
    _, emb = source.text_embedding_table()
    dim = clip_embed_dim(cfg.embed)
    if dim is not None and emb.shape[1] != dim:
        raise SourceError(f"table {source.path!r} column {source.text_embedding_column!r} holds text embeddings of dim "
                          f"{emb.shape[1]}, the image embeddings ({cfg.embed.model}) dim {dim}: clip_score needs both from one CLIP model")
    return int(emb.shape[1])


# ---- checks that need only the config (run before anything heavy is imported) -------------------------------------
SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval", "holdout"})


def check_step_fractions(cfg: CurateConfig) -> None:
    """Refuses steps whose budgets cannot all apply, from the fractions alone, before any work.

    keep_fraction is a fraction of all scorable rows; semdedup's target_keep_of_entering a fraction of the rows entering
    it. A later keep_fraction larger than what the earlier steps can leave is an error naming both steps and numbers.
    """
    most, limit = 1.0, None  # the largest fraction of all rows still alive, and the step that set it
    for position, step in enumerate(cfg.steps):
        knobs = step.knobs()
        fraction = knobs.get("keep_fraction")
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and step.scorer != "coreset_weight":
            if fraction > most * (1 + 1e-9) and limit is not None:
                raise ValueError(
                    f"step {position} ({step.scorer}): keep_fraction {fraction:g} asks for {fraction:.0%} of all rows, but "
                    f"{limit} leaves at most {most:.0%}; lower keep_fraction (it is a fraction of all scorable rows) "
                    "or keep more in the earlier step"
                )
            most, limit = fraction, f"step {position} ({step.scorer}) with keep_fraction {fraction:g}"
        target = knobs.get("target_keep_of_entering")
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            most *= target
            limit = f"step {position} ({step.scorer}) with target_keep_of_entering {target:g}" + (
                f" after {limit}" if limit else ""
            )


def split_like_labels(source: dict[str, Any]) -> list[str]:
    """The folder names an image_folder source would take as labels when they look like split names (train/test/val).

    Empty when the source is not an image folder, has `split` or `labels_from_subfolders: false`, or its top folders
    are not all split-like. Cheap: reads one directory.
    """
    import os

    if source.get("kind") != "image_folder" or source.get("split") or source.get("labels_from_subfolders") is False:
        return []
    try:
        folders = sorted(e.name for e in os.scandir(source["root"]) if e.is_dir() and not e.name.startswith("."))
    except (OSError, KeyError, TypeError):
        return []
    return folders if folders and all(name.lower() in SPLIT_NAMES for name in folders) else []


# ---- a deployment's typed parameters ------------------------------------------------------------------------------


def merge_run_parameters(
    base: dict[str, Any],
    *,
    name: str | None = None,
    keep_fraction: float | None = None,
    steps: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> CurateConfig:
    """A config mapping with a run's explicit overrides applied, validated as a whole before any work.

    `overrides` are dotted keys like the CLI's --set (e.g. {"index.k": 50}); then `name`, `steps` (the whole list)
    and `keep_fraction`, which sets the keep_fraction of every step that has one (an error when none has).
    """
    import copy

    raw = copy.deepcopy(base)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if name is not None:
        raw["name"] = name
    if steps is not None:
        raw["steps"] = [dict(s) for s in steps]
    if keep_fraction is not None:
        budgeted = [s for s in raw.get("steps") or [] if isinstance(s, dict) and "keep_fraction" in s]
        if not budgeted:
            raise ValueError("keep_fraction given but no step of this config has a keep_fraction to set")
        for step in budgeted:
            step["keep_fraction"] = keep_fraction
    return CurateConfig.model_validate(raw)
