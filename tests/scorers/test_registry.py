"""The step registry (scorers/step.py): a scorer is one file, and everything else learns about it from the registry."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

import scorers
from scorers import step as step_module
from scorers.step import ScoringContext, StepOutput, registry, step, validate_steps

ROOT = Path(__file__).resolve().parents[2]

TOY = '''
"""Toy scorer for the registry test: the embedding's first coordinate. Higher = harder."""
from __future__ import annotations

import numpy as np

from scorers.step import Count, Fraction, Score, ScoringContext, StepOutput, select_among_alive, step


def first_coordinate(emb: np.ndarray, *, power: int = 1) -> np.ndarray:
    return np.asarray(emb[:, 0], dtype=np.float32) ** power


@step("toy_first", reason="toy_first", needs=("labels",),
      scores=(Score("score_toy_first", higher="harder", hardness=1, nullable=False),),
      orientation="score_toy_first: the first embedding coordinate; higher = harder")
def step_toy_first(ctx: ScoringContext, *, keep_fraction: Fraction, power: Count = 1) -> StepOutput:
    scores = first_coordinate(np.asarray(ctx.emb[:]), power=power)
    drop, note = select_among_alive(ctx, scores, keep_fraction, rule="hard")
    return StepOutput(scores={"score_toy_first": scores}, drop=drop, info=note)
'''


@pytest.fixture
def toy_scorer(tmp_path, monkeypatch):
    """A scorer in a new file of the scorers package (a folder added to the package's path), nothing else edited;
    the registry and the module are restored afterwards."""
    folder = tmp_path / "more_scorers"
    folder.mkdir()
    (folder / "toy_first.py").write_text(TOY)
    monkeypatch.setattr(scorers, "__path__", [*scorers.__path__, str(folder)])
    monkeypatch.setattr(step_module, "_REGISTRY", dict(step_module._REGISTRY))
    yield "toy_first"
    sys.modules.pop("scorers.toy_first", None)


def _precomputed(folder: Path, n: int = 60, labels: bool = True) -> dict:
    rng = np.random.default_rng(0)
    (folder / "emb").mkdir(parents=True)
    (folder / "meta").mkdir()
    np.save(folder / "emb" / "000.npy", rng.standard_normal((n, 8)).astype(np.float32))
    cols = {"key": [f"k{i:03d}" for i in range(n)], **({"label": [f"c{i % 3}" for i in range(n)]} if labels else {})}
    pq.write_table(pa.table(cols), folder / "meta" / "000.parquet")
    return {"kind": "precomputed", "emb_paths": str(folder / "emb" / "*.npy"), "meta_paths": str(folder / "meta" / "*.parquet"),
            **({"label_column": "label"} if labels else {})}


def test_a_scorer_in_a_new_file_runs_end_to_end(toy_scorer, tmp_path):
    from pipeline import stages
    from pipeline.config import CurateConfig, check_plan_size
    from pipeline.manifest import read_manifest
    from pipeline.report import hardness_columns, write_report

    assert toy_scorer in registry()
    cfg = CurateConfig.model_validate({
        "name": "toy", "source": _precomputed(tmp_path / "pre"), "embed": {"kind": "precomputed"}, "index": {"k": 3},
        "steps": [{"scorer": "toy_first", "keep_fraction": 0.5, "power": 1}], "output_root": str(tmp_path / "runs"),
    })
    info = stages.run_in_process(cfg)
    manifest = read_manifest(cfg.run_dir)  # validated: its reasons come from the registry
    assert (manifest["reason"] == "toy_first").sum() == 30 and manifest["keep"].sum() == 30
    assert manifest["score_toy_first"].is_not_nan().all()
    for label, part in manifest.group_by("label"):  # rule hard keeps the highest, class by class
        assert part.filter(part["keep"])["score_toy_first"].min() >= part.filter(~part["keep"])["score_toy_first"].max()
    assert info["orientation"]["toy_first"].startswith("score_toy_first:")
    assert hardness_columns(info["steps"]) == {"score_toy_first": 1}
    html = write_report(cfg.run_dir).read_text()
    assert "data-column='score_toy_first'" in html and "the first embedding coordinate" in html
    # its declarations reach the checks before any work: needs labels, knob names, types and ranges
    with pytest.raises(ValueError, match=r"step 0 \(toy_first\) needs labels"):
        check_plan_size(cfg, 60, has_labels=False)
    with pytest.raises(ValueError, match=r"unknown knobs \['powr'\] \(did you mean 'power'\?\)"):
        validate_steps([("toy_first", {"keep_fraction": 0.5, "powr": 2})])
    with pytest.raises(ValueError, match=r"power must be an integer ≥ 1, got 0"):
        validate_steps([("toy_first", {"keep_fraction": 0.5, "power": 0})])
    with pytest.raises(ValueError, match=r"needs keep_fraction"):
        validate_steps([("toy_first", {})])


def test_the_registry_imports_only_files_that_declare_a_step(toy_scorer):
    """A helper file without @step (like distill.py, which imports torch) is not imported to validate a config."""
    helper = Path(scorers.__path__[-1]) / "toy_helper.py"
    helper.write_text('raise RuntimeError("a file without @step was imported by registry()")\n')
    assert toy_scorer in registry()
    assert "scorers.toy_helper" not in sys.modules


def test_the_readme_scorer_table_matches_the_registry():
    """Every registered step has a row in README.md's scorer table with its drop reason and exactly its score columns."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| scorer | what | drops with reason | score column |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0]).group(1)
        rows[name] = (cells[-2], cells[-1])
    specs = registry()
    assert sorted(rows) == sorted(specs), "README scorer table rows vs registered steps"
    for name, (reason_cell, score_cell) in rows.items():
        spec = specs[name]
        reason = re.match(r"`(\w+)`", reason_cell)
        assert (reason.group(1) if reason else None) == spec.reason, f"{name}: README reason {reason_cell!r}"
        declared = {re.sub(r"\{(\w+)\}", r"<\1>", s.name) for s in spec.scores}  # score_{name} reads score_<name>
        assert set(re.findall(r"`(score_[\w<>]+)`", score_cell)) == declared, f"{name}: README score columns"


def test_manifest_reasons_come_from_the_registry():
    from manifests.schema import BASE_REASONS, reasons

    assert set(reasons()) == set(BASE_REASONS) | {s.reason for s in registry().values() if s.reason}
    assert {"semdedup", "dbp_quota", "exact_dup"} <= set(reasons())


@pytest.mark.parametrize(
    "knobs, message",
    [  # issue #18: SemDeDup knobs are checked when the config loads, with the accepted values in the message
        ({"eps": -0.1}, r"eps must be in \[0, 2\], got -0.1"),
        ({"eps": 5}, r"eps must be in \[0, 2\], got 5"),
        ({"eps": "0.05"}, r"eps must be in \[0, 2\], got '0.05'"),
        ({"eps": 0.05, "eps_grid": [0.01, -1]}, r"eps_grid must be a list of values in \[0, 2\], got \[0.01, -1\]"),
        ({"eps": 0.05, "eps_grid": ["abc"]}, r"eps_grid must be a list"),
        ({"eps": 0.05, "keep": "sideways"}, r"keep must be one of 'hard', 'easy', 'random', got 'sideways'"),
        ({"eps": 0.05, "batch_size": 0}, r"batch_size must be an integer ≥ 1, got 0"),
        ({"eps": 0.05, "batch_size": 2.5}, r"batch_size must be an integer ≥ 1, got 2.5"),
        ({"epss": 0.05}, r"unknown knobs \['epss'\] \(did you mean 'eps'\?\)"),
    ],
)
def test_semdedup_knobs_are_refused_when_the_config_loads(knobs, message):
    from pipeline.config import CurateConfig

    with pytest.raises(ValidationError, match=message):
        CurateConfig.model_validate({"source": {"kind": "image_folder", "root": "x"}, "steps": [{"scorer": "semdedup", **knobs}]})


def test_every_knob_of_every_step_has_a_checked_type():
    """No knob is left as a bare Any: its annotation gives the type (and the message says what is accepted)."""
    from typing import Any

    from scorers.step import describe

    for name, spec in registry().items():
        for knob in spec.knobs:
            annotation = spec.knob_type(knob)
            assert annotation is not Any, f"{name}.{knob} has no type"
            assert describe(annotation), f"{name}.{knob}"


def test_step_declarations_are_checked(monkeypatch):
    monkeypatch.setattr(step_module, "_REGISTRY", dict(step_module._REGISTRY))

    with pytest.raises(TypeError, match="keyword-only"):
        @step("bad_positional", reason="x", orientation="")
        def bad(ctx: ScoringContext, keep_fraction: float = 0.5) -> StepOutput: ...

    with pytest.raises(ValueError, match="unknown needs"):
        @step("bad_needs", reason="x", orientation="", needs=("gpu",))
        def bad_needs(ctx: ScoringContext) -> StepOutput: ...

    with pytest.raises(ValueError, match="exactly_one names knobs"):
        @step("bad_group", reason="x", orientation="", exactly_one=(("a", "b"),))
        def bad_group(ctx: ScoringContext, *, a: int | None = None) -> StepOutput: ...

    with pytest.raises(ValueError, match="two steps are named 'random'"):
        @step("random", reason="random", orientation="")
        def another_random(ctx: ScoringContext) -> StepOutput: ...


def test_a_step_may_write_only_what_it_declares(monkeypatch):
    from pipeline.scoring import run_steps

    monkeypatch.setattr(step_module, "_REGISTRY", dict(step_module._REGISTRY))

    @step("sloppy", reason=None, orientation="")
    def sloppy(ctx: ScoringContext, *, drop: bool = False) -> StepOutput:
        if drop:
            return StepOutput(drop=np.ones(len(ctx.alive), bool))
        return StepOutput(scores={"score_undeclared": np.zeros(len(ctx.alive), np.float32)})

    ctx = ScoringContext(emb=np.eye(4, dtype=np.float32), uids=np.arange(4), labels=None, sha1=None, kmeans=None,
                         alive=np.ones(4, bool), n_scorable=4)
    with pytest.raises(ValueError, match="undeclared score column score_undeclared"):
        run_steps(ctx, [("sloppy", {})])
    with pytest.raises(ValueError, match="declares no reason"):
        run_steps(ctx, [("sloppy", {"drop": True})])
