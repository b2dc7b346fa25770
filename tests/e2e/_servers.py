"""Real servers for the scheduling tests: `prefect server start` on loopback, started and stopped by the test."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a winnow / prefect process under test: this checkout first on the path, offline, its own
    PREFECT_HOME, and the server's API when given (none otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(home), HF_HUB_OFFLINE="1", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (what a process started with start_new_session=True started, including
    children that moved to process groups of their own, as Ray's workers do)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_group(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, wait_s: float = 30) -> None:
    """Stops a process started with start_new_session=True and everything in its session."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for _ in range(3):  # children that outlived their parent
        left = session_pids(proc.pid)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.wait(10)
    assert not session_pids(proc.pid), f"processes of session {proc.pid} still alive"


@contextmanager
def prefect_server(home: Path, *, scheduler_loop_s: float = 2) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port with a fresh database; yields its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = client_env(
        home,
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'server.db'}",
        # the scheduler service inserts scheduled runs every loop: a short loop so a test sees them in seconds
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=str(scheduler_loop_s),
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}: {(home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after 180 s: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, sig=signal.SIGINT)
        log.close()


def make_images(root: Path, n_per_class: int = 20) -> None:
    """Small real PNG files in three class folders (with a few exact copies, for exact_dup)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
            pixels = np.clip(base + rng.normal(0, 30, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.png")
        (root / c / "copy.png").write_bytes((root / c / "000.png").read_bytes())


def write_config(path: Path, images: Path, out: Path, name: str, extra: str = "") -> Path:
    """A small pixels-embedder curate config (exact_dup, then random keeping half); `extra` is more YAML."""
    path.write_text(
        f"name: {name}\nsource: {{kind: image_folder, root: {images}}}\n"
        "embed: {kind: pixels, shard_size: 30, num_workers: 0, pixels: {size: 8, dim: 16}}\nindex: {k: 4}\n"
        "steps:\n  - {scorer: exact_dup}\n  - {scorer: random, keep_fraction: 0.5}\n"
        f"output_root: {out}\nreport: false\n{extra}"
    )
    return path
