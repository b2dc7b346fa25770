"""First use as a person meets it (issue #19): every error is one `winnow: error:` line with exit status 2, found
before heavy imports and before any server starts; progress, Ctrl-C and leftover processes of real runs; --version;
the printed Polars one-liner; summary and report of a distill run.

Every test runs `winnow` as a subprocess (the module, from this checkout) and asserts on its output and exit status.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.reliability._helpers import kill_tagged, tagged_processes, write_run

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "prefect", "faiss", "open_clip")


def winnow(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (exit status 2, nothing on stdout, no traceback)."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("winnow: error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "errors.pydantic.dev" not in out.stderr
    return lines[0]


def _images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _config(path: Path, **cfg) -> Path:
    base = {"source": {"kind": "image_folder", "root": "imgs"}, "embed": {"kind": "pixels"}, "index": {"k": 2}}
    path.write_text(yaml.safe_dump({**base, **cfg}, sort_keys=False))
    return path


# ---- config files that cannot be read -----------------------------------------------------------------------------
def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nsource: {kind: image_folder, root: imgs\nsteps: []\n")
    line = one_error_line(winnow("run", str(cfg)))
    assert f"config {cfg}: line 3, column 6: YAML syntax error" in line


def test_an_image_passed_as_the_config_names_the_file(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), "red").save(jpeg)
    line = one_error_line(winnow("run", str(jpeg)))
    assert line.startswith(f"winnow: error: config {jpeg} is not a text file")


def test_missing_config_and_a_list_at_the_top(tmp_path):
    assert "not found" in one_error_line(winnow("run", str(tmp_path / "nope.yaml")))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must hold a mapping at the top level" in one_error_line(winnow("run", str(tmp_path / "list.yaml")))


# ---- validation errors: one line, closest key ------------------------------------------------------------------------
def test_top_level_and_section_typos_suggest_the_closest_key(tmp_path):
    cfg = _config(tmp_path / "c.yaml", indx={"k": 3}, k=4, embed={"kind": "pixels", "batchsize": 8})
    line = one_error_line(winnow("run", str(cfg)))
    assert "embed.batchsize: unknown key; did you mean embed.batch_size?" in line
    assert "indx: unknown key; did you mean index?" in line
    assert "k: unknown key; did you mean index.k?" in line
    assert "Extra inputs are not permitted" not in line


def test_wrong_type_and_literal_name_the_key_and_the_value(tmp_path):
    cfg = _config(tmp_path / "c.yaml", embed={"kind": "clp"}, index={"k": "many"})
    line = one_error_line(winnow("run", str(cfg)))
    assert "embed.kind: Input should be 'clip', 'pixels' or 'precomputed', got 'clp'" in line
    assert "index.k: Input should be a valid integer" in line and "got 'many'" in line


def test_knob_error_inside_a_step_is_one_line(tmp_path):
    cfg = _config(tmp_path / "c.yaml", steps=[{"scorer": "random", "keep_fraction": 1.5}])
    assert "keep_fraction must be in (0, 1]" in one_error_line(winnow("run", str(cfg)))


def test_set_indexes_into_steps(tmp_path):
    from pipeline.config import load_config

    _images(tmp_path / "imgs", 4)
    cfg = _config(tmp_path / "c.yaml", steps=[{"scorer": "exact_dup"}, {"scorer": "random", "keep_fraction": 0.5}])
    assert load_config(cfg, {"steps.1.keep_fraction": 0.25}).steps[1].knobs() == {"keep_fraction": 0.25}
    # the value reaches step 1 through the command line (and is validated there)
    assert "step 1 (random): keep_fraction must be in" in one_error_line(winnow("run", str(cfg), "--set", "steps.1.keep_fraction=0"))
    line = one_error_line(winnow("run", str(cfg), "--set", "steps.5.keep_fraction=0.3"))
    assert "--set steps.5.keep_fraction: steps has 2 entries (indexes 0..1)" in line
    assert "index it with a number" in one_error_line(winnow("run", str(cfg), "--set", "steps.last.keep_fraction=0.3"))
    assert "not a section or a list" in one_error_line(winnow("run", str(cfg), "--set", "steps.0.scorer.x=1"))


# ---- checks before anything starts ----------------------------------------------------------------------------------
def _imports_of_a_refused_run(cfg: Path, message: str) -> set[str]:
    """`winnow run cfg` under `python -X importtime`: it must refuse with one line holding `message`, start no
    server; returns the top-level modules it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "run", str(cfg)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr[-1500:]
    assert "Starting temporary server" not in out.stderr
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines() if line.startswith("import time:")}


def test_config_and_source_errors_come_before_prefect_and_any_server(tmp_path):
    """A knob typo and a missing source root are refused before Prefect is imported or its server starts."""
    typo = _config(tmp_path / "typo.yaml", steps=[{"scorer": "random", "keep_fration": 0.5}])
    missing_root = _config(tmp_path / "root.yaml", source={"kind": "image_folder", "root": "no/such/folder"})
    for cfg, message in ((typo, "keep_fration"), (missing_root, f"{tmp_path / 'no/such/folder'}' is not a directory")):
        assert "prefect" not in _imports_of_a_refused_run(cfg, message)


def test_a_config_key_error_imports_no_heavy_module(tmp_path):
    """What made config errors take ~5 s: torch, faiss, open_clip and Prefect are not imported for a bad key."""
    cfg = _config(tmp_path / "c.yaml", sorce={"kind": "image_folder"})
    assert not _imports_of_a_refused_run(cfg, "sorce: unknown key; did you mean source?") & set(HEAVY)


def test_a_step_knob_error_imports_no_heavy_module(tmp_path):
    """Step knobs are checked from the registry, which imports the step modules: they bind torch and faiss lazily."""
    cfg = _config(tmp_path / "typo.yaml", steps=[{"scorer": "random", "keep_fration": 0.5}])
    assert not _imports_of_a_refused_run(cfg, "keep_fration") & set(HEAVY)


def test_pretrained_tag_offline_is_refused_before_anything_starts(tmp_path):
    _images(tmp_path / "imgs", 4)
    cfg = _config(tmp_path / "c.yaml", embed={"kind": "clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
                  output_root="runs")
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = winnow("run", str(cfg), env=empty_cache)
    line = one_error_line(out)
    assert "Starting temporary server" not in out.stderr + out.stdout  # refused before Prefect (and any ingest)
    assert "embed.pretrained 'laion2b_s34b_b79k' of embed.model 'ViT-B-32'" in line and "offline" in line
    assert "set embed.checkpoint:" in line and "--checkpoint" not in line
    assert not (tmp_path / "runs").exists()


def test_budgets_that_cannot_all_apply_name_the_steps_and_numbers(tmp_path):
    _images(tmp_path / "imgs", 4)
    cfg = _config(tmp_path / "c.yaml", steps=[{"scorer": "semdedup", "target_keep_of_entering": 0.3},
                                              {"scorer": "dbp", "keep_fraction": 0.5}])
    line = one_error_line(winnow("run", str(cfg)))
    assert ("step 1 (dbp): keep_fraction 0.5 asks for 50% of all rows, but step 0 (semdedup) with "
            "target_keep_of_entering 0.3 leaves at most 30%") in line
    cfg = _config(tmp_path / "d.yaml", steps=[{"scorer": "random", "keep_fraction": 0.2}, {"scorer": "dbp", "keep_fraction": 0.4}])
    assert "step 1 (dbp): keep_fraction 0.4 asks for 40% of all rows, but step 0 (random) with keep_fraction 0.2" in one_error_line(
        winnow("run", str(cfg)))


def test_split_names_as_labels_warn(tmp_path):
    for split in ("train", "test"):
        _images(tmp_path / "data" / split / "cat", 2)
    # the warning comes in the checks before the run; the offline weights then stop it (no run needed here)
    cfg = _config(tmp_path / "c.yaml", source={"kind": "image_folder", "root": "data"}, embed={"kind": "clip"})
    out = winnow("run", str(cfg), env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert ("winnow: warning: the folders under source.root (test, train) look like split names, and would become the "
            "labels; set source.split: train") in out.stderr
    quiet = _config(tmp_path / "d.yaml", source={"kind": "image_folder", "root": "data", "split": "train"}, embed={"kind": "clip"})
    assert "warning" not in winnow("run", str(quiet), env={"HF_HOME": str(tmp_path / "hf")}).stderr


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    from pipeline.config import load_config

    (tmp_path / "project").mkdir()
    cfg = _config(tmp_path / "project" / "c.yaml", store_dir="cache/store", output_root="out",
                  steps=[{"scorer": "ot_target", "target": {"kind": "image_folder", "root": "target"}, "keep_fraction": 0.5}])
    loaded = load_config(cfg)
    assert loaded.source.arguments()["root"] == str(tmp_path / "project" / "imgs")
    assert loaded.store_path == tmp_path / "project" / "cache" / "store"
    assert loaded.run_dir == tmp_path / "project" / "out" / "curate"
    assert loaded.steps[0].knobs()["target"]["root"] == str(tmp_path / "project" / "target")
    # from another working directory, the error names the folder beside the config
    line = one_error_line(winnow("run", "project/c.yaml", cwd=tmp_path))
    assert f"{tmp_path / 'project' / 'imgs'}' is not a directory" in line


def test_version():
    out = winnow("--version")
    assert out.returncode == 0 and re.fullmatch(r"winnow \d+\.\d+\.\d+\S*\n", out.stdout), out


# ---- after a run: the one-liner, summary and report -----------------------------------------------------------------
def test_printed_polars_one_liner_runs_in_a_shell(tmp_path):
    from flows.cli import format_summary

    run_dir = tmp_path / "my run's dir"  # a space and a quote: the command must still be quoted right
    write_run(run_dir)
    info = {"config": {"name": "t", "embed": {"kind": "pixels"}},
            "counts": {"samples": 30, "kept": 20, "by_reason": {"semdedup": 10}}, "steps": [], "timings_s": {}}
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # a shell where the venv is not activated
    os.environ.pop("VIRTUAL_ENV", None)
    command = format_summary(info, run_dir / "manifest.parquet").splitlines()[-1].split("query it: ", 1)[1]
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "semdedup" in out.stdout and "10" in out.stdout and "20" in out.stdout


def _distill_run(tmp_path: Path) -> Path:
    """A distill run's directory written by pipeline.distill's own writer (no training needed for its run.json)."""
    from pipeline.distill import DistillConfig, SynSet, build_run_info, write_pixel_set

    cfg = DistillConfig.model_validate({"name": "tiny-distill", "output_root": str(tmp_path / "runs"),
                                        "data": {"kind": "npz", "name": "fashion_mnist"}, "ipc": 1})
    rng = np.random.default_rng(0)
    syn = SynSet(x=rng.integers(0, 255, (2, 8, 8, 1), dtype=np.uint8), y=np.array([0, 1]), losses=[0.5, 0.25], seed=0, seconds=1.0,
                 init_indices=np.array([0, 1]))

    class Data:
        description = {"kind": "npz", "name": "fashion_mnist", "pool": 100, "test": 50}
        classes = ["shirt", "shoe"]
        n_classes = 2

    evaluation = {"enabled": True, "synthetic": {"mean": 0.61, "std": 0.02, "n": 2},
                  "random_real": {"mean": 0.52, "std": 0.03, "n": 2}}
    info = build_run_info(cfg, Data(), syn, evaluation=evaluation, timings={"distill": 1.0}, device="cpu")
    write_pixel_set(cfg.run_dir, syn, Data.classes, method="dm", run_info=info)
    return cfg.run_dir


def test_summary_and_report_of_a_distill_run(tmp_path):
    run_dir = _distill_run(tmp_path)
    out = winnow("summary", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "winnow distill 'tiny-distill' — dm, 2 synthetic samples (1 per class)" in out.stdout
    assert "synthetic    test accuracy 61.00 ± 2.00 (n=2)" in out.stdout
    assert "random_real  test accuracy 52.00 ± 3.00 (n=2)" in out.stdout
    out = winnow("report", str(run_dir))
    assert out.returncode == 0, out.stderr
    page = (run_dir / "report.html").read_text()
    assert "winnow report — tiny-distill" in page and "61.00% ± 2.00" in page and "52.00% ± 3.00" in page
    assert "<td>embedder</td><td>?</td>" not in page


# ---- real runs: progress, Ctrl-C, SIGKILL ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    for label in ("a", "b"):
        _images(root / label, 60, seed=ord(label))
    return root


def _run_config(tmp: Path, folder: Path, **embed) -> Path:
    cfg = {"name": "r", "source": {"kind": "image_folder", "root": str(folder)},
           "embed": {"kind": "pixels", "shard_size": 20, "num_workers": 1, **embed}, "index": {"k": 4},
           "steps": [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.01}, {"scorer": "dbp", "keep_fraction": 0.5}],
           "output_root": str(tmp / "runs"), "report": False}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the runs of this module: the temporary server's database migrations run once."""
    return tmp_path_factory.mktemp("prefect_home")


def _start(tmp: Path, home: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(home), "WINNOW_TEST_TAG": tag,
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900"}  # a first start migrates; slow on a busy machine
    env.pop("PREFECT_API_URL", None)
    log = tmp / f"out-{tag[:6]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tag, log


def _wait_for_shards(proc: subprocess.Popen, done_dir: Path, n: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} shards were not finished in time (exit {proc.poll()})")


@pytest.mark.slow
def test_run_shows_one_progress_line_per_stage_and_no_task_state_lines(folder, prefect_home, tmp_path):
    proc, tag, log = _start(tmp_path, prefect_home, str(_run_config(tmp_path, folder)))
    try:
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        kill_tagged(tag)
    text = log.read_text()
    assert "embed: 120/120 images (100%)" in text and "images/s, done in" in text
    assert "index: assign: 6/6 shards (100%)" in text and "score: semdedup: 120/120 rows (100%)" in text
    assert not re.search(r"Task run '[^']+' - Finished in state Completed\(\)", text)
    assert "manifest:" in text


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_a_rerun_resumes(folder, prefect_home, tmp_path):
    config = _run_config(tmp_path, folder)
    proc, tag, log = _start(tmp_path, prefect_home, str(config))
    try:
        _wait_for_shards(proc, tmp_path / "runs" / "r" / "store" / "_done", 2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(120) == 130
        deadline = time.monotonic() + 30
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tagged_processes(tag) == []  # the server, workers and helpers are gone
    finally:
        kill_tagged(tag)
    text = log.read_text()
    stopped = re.search(r"winnow: stopped; (\d+) of 6 embedding shards are finished\. Rerun the same command to resume", text)
    assert stopped and int(stopped.group(1)) >= 2, text[-3000:]
    assert "Traceback" not in text and "Crash detected" not in text and "Failed(" not in text, text[-3000:]
    assert text.rstrip().endswith("finished shards are reused."), text[-3000:]  # the last line says how to go on
    proc, tag, log = _start(tmp_path, prefect_home, str(config))
    try:
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        kill_tagged(tag)
    assert f"embed shards reused from an earlier run: {stopped.group(1)}" in log.read_text()


@pytest.mark.slow
def test_no_process_outlives_a_sigkilled_run(folder, prefect_home, tmp_path):
    from pipeline.reaper import descendants

    proc, tag, log = _start(tmp_path, prefect_home, str(_run_config(tmp_path, folder, batch_size=4)), "-v")
    try:
        _wait_for_shards(proc, tmp_path / "runs" / "r" / "store" / "_done", 1)
        deadline = time.monotonic() + 120  # -v: the finished shard's task state line
        while not re.search(r"Task run 'embed_shard-\d+' - Finished in state Completed\(\)", log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        children = descendants({proc.pid})
        names = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid, _ in children]
        assert any(b"uvicorn" in n for n in names), names  # Prefect's temporary server is among them
        os.kill(proc.pid, signal.SIGKILL)  # only the run itself, as the OOM killer does
        proc.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid, _ in children):
            time.sleep(0.2)
        left = [pid for pid, _ in children if Path(f"/proc/{pid}").exists() and pid in tagged_processes(tag)]
        assert left == [], names
    finally:
        kill_tagged(tag)
