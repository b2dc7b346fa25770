"""`runner: {kind: ray, address: ray://...}` against a standing `ray start --head` cluster on loopback with token
auth (started and stopped here, every process of it ended): the run completes on the cluster and gives the same
manifest as the same config on local threads."""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.manifest import read_manifest
from tests.e2e._servers import BIN, REPO, client_env, free_port, make_images, stop_group, write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None, reason="prefect-ray is not installed (extra: ray)"),
    # opt-in: it starts a whole Ray head (4+ minutes on 2 cores); it passed 2 of 3 runs on the 2-core machine, the other
    # failing in Ray itself ("Starting Ray client server failed": the per-job client server exited), so it stays out of CI
    pytest.mark.skipif(not os.environ.get("WINNOW_RAY_CLUSTER_TEST"), reason="opt-in: set WINNOW_RAY_CLUSTER_TEST=1 (starts a Ray head)"),
]


def test_standing_ray_cluster_with_token_auth_gives_the_local_manifest(tmp_path):
    images = tmp_path / "images"
    make_images(images)
    token = secrets.token_hex(16)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on 127.0.0.1 (otherwise it binds the machine's outward address)
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_raylet_start_wait_time_s": "120"}
    gcs_port, client_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="wr", dir="/tmp")  # Ray's socket paths must stay short
    head = None
    try:
        # Ray gives its raylet a fixed 30 s to register: on a busy machine the head can time out, so up to 3 tries
        for attempt in range(3):
            log_path = tmp_path / f"ray-{attempt}.log"
            with open(log_path, "w") as log:
                head = subprocess.Popen(
                    [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                     "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
                     f"--temp-dir={temp_dir}"],
                    env=client_env(tmp_path / "ray_home", **ray_env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            deadline = time.monotonic() + 180
            while "Ray runtime started" not in log_path.read_text() and head.poll() is None:
                assert time.monotonic() < deadline, "ray start --head did not come up in 180 s"
                time.sleep(1)
            if head.poll() is None:
                break
            stop_group(head)
        assert head.poll() is None, log_path.read_text()[-3000:]

        out = tmp_path / "runs"
        address = f"ray://127.0.0.1:{client_port}"
        cfg = write_config(tmp_path / "ray.yaml", images, out / "ray", "cluster", f"runner: {{kind: ray, address: '{address}', workers: 4}}\n")
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True,
                             timeout=900, env=client_env(tmp_path / "home", **ray_env))
        assert run.returncode == 0, run.stderr[-4000:] + _client_server_logs(temp_dir)
        assert f"Connecting to an existing Ray instance at {address}" in run.stderr
        print("ray standing-cluster run:", run.stdout.strip().splitlines()[:3])

        local = write_config(tmp_path / "local.yaml", images, out / "local", "cluster")
        again = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(local)], cwd=REPO, capture_output=True, text=True,
                               timeout=900, env=client_env(tmp_path / "home"))
        assert again.returncode == 0, again.stderr[-4000:]
        assert read_manifest(out / "ray" / "cluster").equals(read_manifest(out / "local" / "cluster"))
    finally:
        if head is not None:
            stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client_server_logs(temp_dir: str) -> str:
    """The tails of Ray's client-server logs (the proxier and the per-job servers it starts), for a failed run."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/ray_client_server*.err"))
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in logs)
