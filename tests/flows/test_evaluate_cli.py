"""`winnow evaluate RUN_DIR`: a real (in-process) run on precomputed embeddings with planted label errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipeline import stages
from pipeline.config import CurateConfig

N, D, CLASSES = 1600, 16, 4


def _write_source(folder: Path, x: np.ndarray, labels: list[str] | None, prefix: str = "k") -> dict:
    (folder / "emb").mkdir(parents=True)
    (folder / "meta").mkdir()
    np.save(folder / "emb" / "000.npy", x.astype(np.float32))
    cols = {"key": [f"{prefix}{i:05d}" for i in range(len(x))]}
    if labels is not None:
        cols["label"] = labels
    pq.write_table(pa.table(cols), folder / "meta" / "000.parquet")
    return {"kind": "precomputed", "emb_paths": str(folder / "emb" / "*.npy"), "meta_paths": str(folder / "meta" / "*.parquet"),
            **({"label_column": "label"} if labels is not None else {})}


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(CLASSES, D)) * 0.9
    y = rng.integers(CLASSES, size=n)
    return means[y] + rng.normal(size=(n, D)), y


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25% of the labels moved to the next class; an AUM step keeps the 70% with the highest margin."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    x, y = _blobs(N, seed=1)
    flipped = np.random.default_rng(2).random(N) < 0.25
    y = np.where(flipped, (y + 1) % CLASSES, y)
    cfg = CurateConfig.model_validate({
        "name": "noisy",
        "source": _write_source(root / "pre", x, [f"c{v}" for v in y]),
        "embed": {"kind": "precomputed"},
        "index": {"k": 8},
        "steps": [{"scorer": "aum", "keep_fraction": 0.7, "n_seeds": 2, "n_folds": 3, "epochs": 6}],
        "output_root": str(root / "runs"),
    })
    stages.run_in_process(cfg)
    return cfg.run_dir


def test_evaluate_writes_run_json_and_says_the_selection_beats_random(noisy_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(noisy_run), "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "selection − random" in out and "better" in out
    info = json.loads((noisy_run / "run.json").read_text())
    ev = info["evaluation"]["selection_vs_random"]
    assert ev["verdict"] == "better" and ev["p_value"] < 0.05
    assert ev["n_pool"] + ev["n_test"] == N and len(ev["random"]["per_seed"]) == 3
    assert info["evaluation"]["split"]["kind"] == "uid_hash"
    # the summary shows it too
    assert main(["summary", str(noisy_run)]) == 0
    assert "selection − random" in capsys.readouterr().out
    assert ev["probe"]["max_iter"] == 50  # the default
    # fewer probe iterations: recorded, and the verdict holds on this easy case
    assert main(["evaluate", str(noisy_run), "--seeds", "3", "--probe-iterations", "20"]) == 0
    ev20 = json.loads((noisy_run / "run.json").read_text())["evaluation"]
    assert ev20["settings"]["probe_iterations"] == 20 and ev20["selection_vs_random"]["probe"]["max_iter"] == 20
    assert ev20["selection_vs_random"]["verdict"] == "better"


def test_evaluate_sweep_prints_the_table_and_a_budget(noisy_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(noisy_run), "--sweep", "--seeds", "2", "--fractions", "0.3,0.7"]) == 0
    out = capsys.readouterr().out
    assert "suggested budget" in out and "best (− random, p)" in out
    sweep = json.loads((noisy_run / "run.json").read_text())["evaluation"]["sweep"]
    assert sweep["fractions"] == [0.3, 0.7] and set(sweep["table"]["0.3"]) == {
        "random", "hard", "easy", "ccs", "moderate", "prototypes", "dbp"}


def test_eval_source_replaces_the_holdout_split(noisy_run: Path, tmp_path: Path) -> None:
    from pipeline.evaluate import evaluate_run
    from pipeline.config import EvaluateConfig

    x, y = _blobs(400, seed=9)  # clean labels
    spec = _write_source(tmp_path / "eval", x, [f"c{v}" for v in y], prefix="e")
    result = evaluate_run(noisy_run, EvaluateConfig.model_validate({"eval_source": spec, "seeds": 2}), write=False)
    assert result["split"]["kind"] == "eval_source" and result["split"]["rows"] == 400
    assert result["selection_vs_random"]["n_pool"] == N and result["selection_vs_random"]["n_test"] == 400


def test_evaluate_without_labels_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x, _ = _blobs(200, seed=3)
    cfg = CurateConfig.model_validate({"name": "nolabels", "source": _write_source(tmp_path / "pre", x, None),
                                       "embed": {"kind": "precomputed"}, "index": {"k": 4},
                                       "steps": [{"scorer": "random", "keep_fraction": 0.5}],
                                       "output_root": str(tmp_path / "runs")})
    stages.run_in_process(cfg)
    assert main(["evaluate", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("winnow: error:") and "labels" in err and err.count("\n") == 1
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2


def test_rule_auto_records_its_evidence_and_reuses_it(tmp_path: Path) -> None:
    import pipeline.evaluate as ev

    x, y = _blobs(1200, seed=4)
    flipped = np.random.default_rng(5).random(1200) < 0.3
    y = np.where(flipped, (y + 1) % CLASSES, y)
    base = {"source": _write_source(tmp_path / "pre", x, [f"c{v}" for v in y]), "embed": {"kind": "precomputed"},
            "index": {"k": 6}, "store_dir": str(tmp_path / "store"), "output_root": str(tmp_path / "runs")}
    step = {"scorer": "el2n", "keep_fraction": 0.5, "n_seeds": 2, "n_folds": 3}
    cfg = CurateConfig.model_validate({**base, "name": "auto", "steps": [step]})
    info = stages.run_in_process(cfg)
    note = info["steps"][0]
    evidence = note["auto_evidence"]
    assert evidence["cached"] is False
    assert set(evidence["table"]) == set(ev.AUTO_CANDIDATES)
    # the chosen rule is the one with the highest held-out accuracy, and it is the rule that ran
    best = max(evidence["table"], key=lambda r: evidence["table"][r]["accuracy"])
    assert evidence["table"][evidence["rule"]]["accuracy"] == evidence["table"][best]["accuracy"]
    assert note["rule"] == evidence["rule"] and evidence["kept_fraction"] == 0.5
    # 30% of the labels are wrong and EL2N ranks them hardest: keeping the hardest half must not be chosen
    assert evidence["rule"] != "hard" and evidence["table"]["easy"]["accuracy"] > evidence["table"]["hard"]["accuracy"]
    # a rerun on the same store reuses the evidence instead of training the probes again
    calls = []
    real = ev.choose_rule
    ev.choose_rule = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = stages.run_in_process(cfg)["steps"][0]["auto_evidence"]
    finally:
        ev.choose_rule = real
    assert not calls and again["cached"] is True and again["rule"] == evidence["rule"]
    # the old fixed switch is still there by name
    cfg2 = CurateConfig.model_validate({**base, "name": "heuristic", "steps": [{**step, "rule": "heuristic"}]})
    note2 = stages.run_in_process(cfg2)["steps"][0]
    assert "auto_evidence" not in note2 and note2["rule"] == "ccs" and note2["why"].startswith("heuristic:")


def test_a_flow_run_with_an_evaluate_block_shows_it_in_the_prefect_artifact(prefect_server, tmp_path: Path) -> None:
    """A scheduled run evaluates through its `evaluate:` block: run.json and the run's Prefect summary artifact say it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.curate import run_curate

    x, y = _blobs(800, seed=4)
    flipped = np.random.default_rng(5).random(len(y)) < 0.25
    y = np.where(flipped, (y + 1) % CLASSES, y)
    info = run_curate({
        "name": "evaluated", "source": _write_source(tmp_path / "pre", x, [f"c{v}" for v in y]),
        "embed": {"kind": "precomputed"}, "index": {"k": 4},
        "steps": [{"scorer": "aum", "keep_fraction": 0.7, "n_seeds": 2, "n_folds": 3, "epochs": 6}],
        "evaluate": {"seeds": 2}, "output_root": str(tmp_path / "runs"),
    })
    assert info["evaluation"]["selection_vs_random"]["n_pool"] > 0
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["winnow-evaluated"])))
    assert artifacts, "no summary artifact"
    text = artifacts[0].data
    assert "## Selection vs random" in text and "selection − random" in text, text
