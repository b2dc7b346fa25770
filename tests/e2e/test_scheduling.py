"""Scheduled curation against a real `prefect server start` on loopback (started and stopped here):
an interval deployment served by `winnow deploy` fires and its runs complete and write manifests; the deployment's
typed parameters (schema, a partial override, a bad value refused); two runs of one run directory at once; a
killed run's stale RUNNING state found by the next run; `winnow deploy` without a server; a work-pool deployment."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.manifest import read_manifest, read_run_info
from tests.e2e._servers import REPO, client_env, make_images, prefect_server, stop_group, write_config

pytestmark = pytest.mark.slow


RETRYABLE = {429, 502, 503}  # what Prefect's own client retries: the server answers 503 when its SQLite database is busy


def api(url: str, path: str, body: dict | None = None, method: str | None = None, attempts: int = 8) -> object:
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method or ("POST" if body is not None else "GET"))
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(min(2 ** attempt, 10))


def flow_runs(url: str, deployment_id: str) -> list[dict]:
    return api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200})


def wait_for(predicate, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect_server")
    with prefect_server(home) as url:
        yield url, home


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sched_images")
    make_images(root)
    return root


def test_interval_deployment_fires_and_takes_typed_parameters(server, images, tmp_path):
    url, _ = server
    out = tmp_path / "runs"
    cfg = write_config(tmp_path / "sched.yaml", images, out, "sched")
    env = client_env(tmp_path / "home", url, PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = open(tmp_path / "serve.log", "w")
    serving = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", str(cfg), "--interval", "90", "--name", "sched"],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deployment = wait_for(lambda: _deployment(url, "sched"), 120, "the deployment to be registered")
        schema = deployment["parameter_openapi_schema"]["properties"]
        assert {"config_path", "config", "name", "keep_fraction", "steps", "overrides"} <= set(schema)
        assert {"type": "number", "exclusiveMinimum": 0, "maximum": 1} in schema["keep_fraction"]["anyOf"]
        assert deployment["parameters"] == {"config_path": str(cfg)}
        assert {"winnow", "run:sched", "step:random", "dataset:" + images.name} <= set(deployment["tags"])
        print("parameter schema:", json.dumps(deployment["parameter_openapi_schema"]["properties"])[:3000])

        def completed_scheduled():
            runs = flow_runs(url, deployment["id"])
            done = [r for r in runs if r["auto_scheduled"] and r["state_type"] == "COMPLETED"]
            return done and (runs, done)

        runs, done = wait_for(completed_scheduled, 900, f"a scheduled run to complete (serve log: {tmp_path / 'serve.log'})")
        started = sorted((r for r in runs if r["auto_scheduled"] and r["state_type"] != "SCHEDULED"), key=lambda r: r["expected_start_time"])
        print("scheduled runs:", [(r["id"], r["name"], r["state_type"], r["expected_start_time"]) for r in started])
        first = done[0]
        assert re.fullmatch(r"sched-\d{8}-\d{6}", first["name"]), first["name"]
        assert {"winnow", "run:sched", "step:exact_dup", "step:random"} <= set(first["tags"])
        info = read_run_info(out / "sched")
        assert info["flow_run"]["id"] in {r["id"] for r in done}  # the manifest on disk is a scheduled run's
        assert info["flow_run"]["url"].endswith(info["flow_run"]["id"])
        manifest = read_manifest(out / "sched")
        assert manifest.height == 63 and 0 < manifest["keep"].sum() < 63

        # a partial override from the API (what `prefect deployment run -p keep_fraction=0.3` sends): merged, validated, run
        manual = api(url, f"/deployments/{deployment['id']}/create_flow_run",
                     {"parameters": {"keep_fraction": 0.3, "name": "sched-manual"}})
        state = wait_for(lambda: _final_state(url, manual["id"]), 900, "the manual run to finish")
        assert state == "COMPLETED", _state_message(url, manual["id"])
        manifest = read_manifest(out / "sched-manual")
        assert manifest["keep"].sum() == round(0.3 * manifest.height)  # random's budget is a fraction of all samples
        assert read_run_info(out / "sched-manual")["flow_run"]["id"] == manual["id"]

        # a value of the wrong type or out of the schema's range is refused by the server before any run exists
        for value in ("most", 1.5):
            with pytest.raises(urllib.error.HTTPError) as refused:
                api(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"keep_fraction": value}})
            assert refused.value.code in (409, 422), value
        # an override the schema cannot judge fails the run at once when the merged config is validated (no work done)
        bad = api(url, f"/deployments/{deployment['id']}/create_flow_run",
                  {"parameters": {"overrides": {"index.k": 0}, "name": "sched-bad"}})
        assert wait_for(lambda: _final_state(url, bad["id"]), 600, "the bad run to fail") == "FAILED"
        assert "index.k" in _state_message(url, bad["id"]) or "greater than or equal to 1" in _state_message(url, bad["id"])
        assert not (out / "sched-bad").exists()
    finally:
        stop_group(serving, sig=signal.SIGINT)
        log.close()


def _deployment(url: str, name: str) -> dict | None:
    try:
        return api(url, f"/deployments/name/curate/{name}")
    except urllib.error.HTTPError:
        return None


def _final_state(url: str, run_id: str) -> str | None:
    state = api(url, f"/flow_runs/{run_id}")["state_type"]
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _state_message(url: str, run_id: str) -> str:
    return str(api(url, f"/flow_runs/{run_id}")["state"].get("message"))


def test_second_run_of_a_run_directory_fails_naming_the_first_and_a_killed_run_is_found_stale(server, images, tmp_path):
    url, _ = server
    out = tmp_path / "runs"
    cfg = write_config(tmp_path / "twice.yaml", images, out, "twice")
    env = client_env(tmp_path / "home", url)
    # the first run holds the run directory, paused after its first embedding shard
    first_log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=tmp_path,
                             env={**env, "WINNOW_PAUSEPOINT": "embed_shard:600"}, stdout=first_log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lock = out / "twice" / ".run.lock"
        holder = wait_for(lambda: lock.exists() and lock.read_text() and json.loads(lock.read_text()), 240, "the first run's lock")
        assert holder["pid"] == first.pid and holder["flow_run_id"]
        second = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        errors = [line for line in second.stderr.splitlines() if line.startswith("winnow: error:")]
        print("second run printed:", errors)
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert errors[0].startswith("winnow: error: run directory") and holder["flow_run_id"] in errors[0]
        assert f"pid {first.pid}" in errors[0]
        assert api(url, f"/flow_runs/{holder['flow_run_id']}")["state_type"] == "RUNNING"

        # killed (no hook runs): the server still says RUNNING until the next run of the directory finds it
        stop_group(first, sig=signal.SIGKILL)
        third = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
        assert third.returncode == 0, third.stderr[-3000:]
        found = [line for line in third.stderr.splitlines() if "did not finish" in line]
        print("third run printed:", found)
        assert found and holder["flow_run_id"] in found[0] and "set to CRASHED" in found[0]
        assert api(url, f"/flow_runs/{holder['flow_run_id']}")["state_type"] == "CRASHED"
        assert read_manifest(out / "twice").height == 63 and not lock.exists()
    finally:
        stop_group(first, sig=signal.SIGKILL)
        first_log.close()


def test_deploy_to_a_process_work_pool(server, images, tmp_path):
    url, _ = server
    cfg = write_config(tmp_path / "pooled.yaml", images, tmp_path / "runs", "pooled")
    env = client_env(tmp_path / "home", url)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", str(cfg), "--cron", "0 3 * * *", "--pool", "winnow-pool"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "work pool winnow-pool created" in out.stdout and "prefect worker start --pool winnow-pool" in out.stdout
    deployment = api(url, "/deployments/name/curate/pooled")
    assert deployment["work_pool_name"] == "winnow-pool" and deployment["entrypoint"] == "flows.curate.curate"
    assert api(url, "/work_pools/winnow-pool")["type"] == "process"
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    # the README's next step: a worker of the pool runs a flow run of the deployment (here one made through the API)
    run = api(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"name": "pooled-now"}})
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "winnow-pool"], cwd=tmp_path,
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        state = wait_for(lambda: _final_state(url, run["id"]), 600, f"the pool's worker to finish the run ({tmp_path / 'worker.log'})")
    finally:
        stop_group(worker)
        log.close()
    assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert read_run_info(tmp_path / "runs" / "pooled-now")["flow_run"]["id"] == run["id"]


def test_deploy_without_a_server_is_one_line(tmp_path, images):
    cfg = write_config(tmp_path / "c.yaml", images, tmp_path / "runs", "nosrv")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", str(cfg), "--cron", "0 3 * * *"], cwd=REPO,
                         env=client_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("winnow: error:")] == [
        line for line in out.stderr.splitlines() if "winnow deploy needs a Prefect server" in line] != []
