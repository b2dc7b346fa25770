"""The winnow command line: help, config errors, deploy, validate, the demo and a training loop over its manifest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from flows.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_every_command_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "deploy", "demo", "report", "validate", "summary", "diff", "store", "distill", "evaluate"}
    for name, command in sub.choices.items():
        assert command.format_help().strip(), name
        assert sub._choices_actions and any(a.dest == name and a.help for a in sub._choices_actions)


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "curate" in out.stdout


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("source: {kind: image_folder, root: x}\nsteps: [{scorer: el2nn}]\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown scorer 'el2nn'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


# Tests that use the Prefect engine do not use capsys: Prefect's console log handler keeps the stream it was
# configured with, and capsys closes its stream at the end of the test.
def test_deploy_builds_a_cron_schedule(prefect_server, tmp_path):
    from flows.deploy import build_deployment

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: nightly\nsource: {kind: image_folder, root: x}\nembed: {kind: pixels}\n")
    deployment = build_deployment(cfg, cron="0 3 * * *")
    assert deployment.name == "nightly"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    # the config file by absolute path (read at each run); overrides are typed parameters of their own
    assert deployment.parameters == {"config_path": str(cfg.resolve())}
    props = deployment._parameter_openapi_schema.properties
    assert {"config_path", "config", "name", "keep_fraction", "steps", "overrides"} <= set(props)
    assert {"winnow", "run:nightly", "dataset:x", "step:exact_dup"} <= set(deployment.tags)
    assert build_deployment(cfg, interval=30).schedules[0].schedule.interval.total_seconds() == 30
    with pytest.raises(ValueError, match="one schedule"):
        build_deployment(cfg)
    assert main(["deploy", str(cfg), "--cron", "0 3 * * *", "--dry-run"]) == 0


def test_demo_end_to_end_and_a_training_loop_over_its_manifest(prefect_server, tmp_path):
    from pipeline.loader import ManifestDataset, weighted_loss, weighted_sampler

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pixels" in out.stdout and "manifest:" in out.stdout and "pl.read_parquet" in out.stdout
    assert "semdedup" in out.stdout and "dbp" in out.stdout
    run_dir = tmp_path / "runs" / "digits-demo"
    manifest = pl.read_parquet(run_dir / "manifest.parquet")
    assert manifest.height == 1797
    assert manifest["keep"].sum() == round(0.5 * manifest.filter(pl.col("reason").ne_missing("bad_input")).height)
    assert main(["validate", str(run_dir)]) == 0
    assert main(["summary", str(run_dir)]) == 0
    assert (run_dir / "report.html").stat().st_size > 10_000  # the flow wrote its report
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0 and (tmp_path / "r.html").exists()

    # the README's training loop: kept samples, weights, a few steps of a real model
    to_tensor = lambda im: torch.from_numpy(__import__("numpy").asarray(im.convert("L"), dtype="float32") / 255.0)[None]
    ds = ManifestDataset(run_dir, transform=to_tensor)
    assert len(ds) == manifest["keep"].sum() and ds.classes == [str(d) for d in range(10)]
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=weighted_sampler(ds))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        for x, y, w in loader:
            loss = weighted_loss(torch.nn.functional.cross_entropy(model(x), y, reduction="none"), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_weighted_loss_and_sampler_statistics():
    from pipeline.loader import weighted_loss

    losses = torch.tensor([1.0, 2.0, 3.0])
    assert weighted_loss(losses, torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx((1 + 2 + 6) / 4)
    assert weighted_loss(losses, torch.tensor([2.0, 2.0, 4.0])).item() == pytest.approx((1 + 2 + 6) / 4)  # scale-free
    with pytest.raises(ValueError):
        weighted_loss(losses, torch.zeros(3))
