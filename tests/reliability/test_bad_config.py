"""Bad configuration is a clear error before any work starts: at config load, or right after the ingest plan (before
anything is embedded) for what depends on the number of samples."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline import ingest
from pipeline.config import CurateConfig, check_before_embedding, check_plan_size, check_targets, load_config
from pipeline.index import KMeansParams, KMeansResult
from scorers.step import ScoringContext, budget_for


def _cfg(steps=None, **extra) -> dict:
    cfg = {"source": {"kind": "image_folder", "root": "x"}, "embed": {"kind": "pixels"}, **extra}
    if steps is not None:
        cfg["steps"] = steps
    return cfg


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"scorer": "nope"}], "unknown scorer 'nope'"),
        ([{"scorer": "random", "keep_fraction": 0}], r"keep_fraction must be in \(0, 1\], got 0"),
        ([{"scorer": "random", "keep_fraction": -0.2}], "keep_fraction must be in"),
        ([{"scorer": "random", "keep_fraction": 1.01}], "keep_fraction must be in"),
        ([{"scorer": "random", "keep_fraction": float("nan")}], "keep_fraction must be in"),
        ([{"scorer": "random", "keep_fraction": True}], "keep_fraction must be in"),
        ([{"scorer": "random", "keep_fraction": "0.5"}], "keep_fraction must be in"),
        ([{"scorer": "semdedup", "target_keep_of_entering": 0}], "target_keep_of_entering must be in"),
        ([{"scorer": "semdedup", "target_keep_fraction": 0.9}],
         "'target_keep_fraction' was renamed: use target_keep_of_entering, a fraction of the rows entering this step"),
        ([{"scorer": "coreset_weight", "coreset_fraction": 2}], "coreset_fraction must be in"),
        ([{"scorer": "dbp"}], r"step 0 \(dbp\): needs keep_fraction"),
        ([{"scorer": "semdedup"}], "give exactly one of eps or target_keep_of_entering"),
        ([{"scorer": "semdedup", "eps": 0.01, "target_keep_of_entering": 0.5}], r"exactly one .* \(got both\)"),
        ([{"scorer": "ot_target", "keep_fraction": 0.5}], r"step 0 \(ot_target\): needs target"),
        ([{"scorer": "ot_target", "target": "imgs/", "keep_fraction": 0.5}], "target must be a source mapping"),
        ([{"scorer": "exact_dup"}, {"scorer": "random", "bogus": 1}], r"step 1 \(random\): unknown knobs \['bogus'\]"),
    ],
)
def test_bad_steps_are_refused_when_the_config_loads(steps, message):
    with pytest.raises(ValidationError, match=message):
        CurateConfig.model_validate(_cfg(steps))


def test_good_steps_still_load():
    cfg = CurateConfig.model_validate(
        _cfg([{"scorer": "semdedup", "eps": 0.01}, {"scorer": "dbp", "keep_fraction": 1}, {"scorer": "random", "keep_fraction": 0.5}])
    )
    assert [s.scorer for s in cfg.steps] == ["semdedup", "dbp", "random"]


def test_cli_prints_one_line_and_exits_2_for_a_bad_config(tmp_path, capsys):
    from flows.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("source: {kind: image_folder, root: x}\nembed: {kind: pixels}\nsteps: [{scorer: random, keep_fraction: 0}]\n")
    assert main(["run", str(path), "--set", f"output_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("winnow: error:") and "keep_fraction must be in (0, 1]" in err
    assert not (tmp_path / "runs").exists()  # nothing started


# ---- checks that need the number of samples: after the ingest plan, before embedding -------------------------------
def test_k_larger_than_the_number_of_samples():
    cfg = CurateConfig.model_validate(_cfg(index={"k": 50}))
    with pytest.raises(ValueError, match="index.k = 50 clusters but the source lists only 49 samples"):
        check_plan_size(cfg, 49)
    check_plan_size(cfg, 50)


def test_budget_that_keeps_no_sample():
    cfg = CurateConfig.model_validate(_cfg([{"scorer": "random", "keep_fraction": 0.004}], index={"k": 2}))
    with pytest.raises(ValueError, match=r"step 0 \(random\): keep_fraction 0.004 of 100 samples keeps no sample"):
        check_plan_size(cfg, 100)
    check_plan_size(cfg, 200)  # 0.8 rounds to one row


def test_no_samples_and_labels_needed_but_absent():
    cfg = CurateConfig.model_validate(_cfg([{"scorer": "el2n", "keep_fraction": 0.5}], index={"k": 2}))
    with pytest.raises(ValueError, match="has no samples"):
        check_plan_size(cfg, 0)
    with pytest.raises(ValueError, match=r"step 0 \(el2n\) needs labels"):
        check_plan_size(cfg, 100, has_labels=False)
    check_plan_size(cfg, 100, has_labels=True)


def test_budget_zero_at_run_time_is_an_error_too():
    """When decode failures leave fewer rows than listed, the step itself refuses a budget of zero rows."""
    n = 10
    km = KMeansResult(np.eye(1, 4, dtype=np.float32), np.zeros(n, np.int32), np.zeros(n, np.float32), KMeansParams(k=1), False)
    ctx = ScoringContext(emb=np.eye(n, 4, dtype=np.float32), uids=np.array([str(i) for i in range(n)], dtype=object), labels=None,
                         sha1=np.array([str(i) for i in range(n)], dtype=object), kmeans=km, alive=np.ones(n, bool), n_scorable=n)
    with pytest.raises(ValueError, match="keeps no row"):
        budget_for(ctx, 0.01)
    assert budget_for(ctx, 0.1) == 1


def _images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _precomputed(folder, n, dim=4):
    (folder / "emb").mkdir(parents=True)
    (folder / "meta").mkdir(parents=True)
    np.save(folder / "emb" / "0.npy", np.ones((n, dim), np.float32))
    pl.DataFrame({"key": [str(i) for i in range(n)]}, schema={"key": pl.String}).write_parquet(folder / "meta" / "0.parquet")
    return {"kind": "precomputed", "emb_paths": str(folder / "emb" / "*.npy"), "meta_paths": str(folder / "meta" / "*.parquet")}


def test_empty_target_set_is_refused_before_embedding(tmp_path):
    _images(tmp_path / "pool", 6)
    (tmp_path / "empty_target").mkdir()
    empty_folder = {"kind": "image_folder", "root": str(tmp_path / "empty_target")}
    empty_precomputed = _precomputed(tmp_path / "pre", 0)
    for target in (empty_folder, empty_precomputed):
        cfg = CurateConfig.model_validate(
            _cfg([{"scorer": "ot_target", "target": target, "keep_fraction": 0.5}], source={"kind": "image_folder", "root": str(tmp_path / "pool")},
                 index={"k": 2}, output_root=str(tmp_path / "runs"))
        )
        with pytest.raises(ValueError, match=r"step 0 \(ot_target\): the target set .* is empty"):
            check_targets(cfg)
        plan = ingest.plan_ingest(cfg)
        with pytest.raises(ValueError, match="is empty"):
            check_before_embedding(cfg, plan)
    assert not (tmp_path / "runs").exists()  # planning wrote nothing


def test_missing_target_is_refused_before_embedding(tmp_path):
    cfg = CurateConfig.model_validate(
        _cfg([{"scorer": "ot_target", "target": {"kind": "image_folder", "root": str(tmp_path / "nowhere")}, "keep_fraction": 0.5}])
    )
    with pytest.raises(ValueError, match=r"step 0 \(ot_target\): target .*is not a directory"):
        check_targets(cfg)


def test_check_before_embedding_passes_a_good_plan_and_counts_precomputed_rows(tmp_path):
    _images(tmp_path / "pool", 6)
    target = _precomputed(tmp_path / "t", 3)
    cfg = CurateConfig.model_validate(
        _cfg([{"scorer": "ot_target", "target": target, "keep_fraction": 0.5}], source={"kind": "image_folder", "root": str(tmp_path / "pool")},
             index={"k": 6})
    )
    assert check_before_embedding(cfg, ingest.plan_ingest(cfg)) == {"0:ot_target": 3}
    too_many = cfg.model_copy(update={"index": cfg.index.model_copy(update={"k": 7})})
    with pytest.raises(ValueError, match="index.k = 7"):
        check_before_embedding(too_many, ingest.plan_ingest(too_many))
    # a precomputed main source: its plan lists no refs, the metadata rows are counted instead
    pre = CurateConfig.model_validate({"source": _precomputed(tmp_path / "main", 4), "embed": {"kind": "precomputed"}, "index": {"k": 5}})
    with pytest.raises(ValueError, match="only 4 samples"):
        check_before_embedding(pre, ingest.plan_ingest(pre))


def test_config_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")
