"""A failed curate flow run marks its run directory (last_failure.json) and notifies the config's Apprise URL
(here Apprise's json:// to a real HTTP server on loopback, started and stopped by the test)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.e2e._servers import make_images


class _Inbox(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Inbox.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_failed_run_is_marked_and_notified(prefect_server, tmp_path: Path) -> None:
    from flows.curate import FAILURE_FILE, run_curate

    make_images(tmp_path / "images", n_per_class=4)  # 15 images
    server = HTTPServer(("127.0.0.1", 0), _Inbox)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {
        "name": "fails", "source": {"kind": "image_folder", "root": str(tmp_path / "images")},
        "embed": {"kind": "pixels", "num_workers": 0, "pixels": {"size": 8, "dim": 8}},
        "index": {"k": 50},  # more clusters than samples: refused after listing, before any embedding
        "output_root": str(tmp_path / "runs"), "notify": f"json://127.0.0.1:{server.server_port}/hook",
    }
    try:
        with pytest.raises(ValueError, match="index.k = 50"):
            run_curate(config)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    record = json.loads((tmp_path / "runs" / "fails" / FAILURE_FILE).read_text())
    assert record["state"] == "FAILED" and "index.k = 50" in record["message"] and record["flow_run_id"]
    assert record["flow_run_name"].startswith("fails-")
    assert len(_Inbox.received) == 1
    message = _Inbox.received[0]
    assert "winnow run fails: FAILED" in message["title"] and record["flow_run_id"] in message["message"]
    assert not (tmp_path / "runs" / "fails" / ".run.lock").exists()  # released on failure too
