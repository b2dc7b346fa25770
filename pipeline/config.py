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
    store_dir: Path | None = None  # default: <output_root>/<name>/store
    output_root: Path = Path("manifests/runs")
    export_uri: str | None = None  # also copy the finished manifest, report and run.json to <export_uri>/<name>/ (fsspec)
    seed: int = 0
    report: bool = True  # write report.html and a Prefect artifact at the end of the run
    evaluate: EvaluateConfig | None = None  # measure the selection against random after the run (README 'Evaluate')

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


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CurateConfig:
    """Reads a YAML config; relative paths inside it stay relative to the current directory."""
    return CurateConfig.model_validate(read_yaml_mapping(path, overrides))


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping, with `--set` overrides (dotted keys) applied; validation is the caller's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


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
    """check_plan_size and check_targets for an ingest plan (ingest.IngestPlan: `.n_samples`, `.has_labels`).

    Returns check_targets' counts.
    """
    check_plan_size(cfg, plan.n_samples, has_labels=plan.has_labels)
    return check_targets(cfg)
