"""Failpoints: named places where a test can SIGKILL the running process, to prove that a rerun recovers.

Set WINNOW_FAILPOINT=<name>[:<n>] and the n-th time (default the first) the process passes `failpoint(name)`
it kills itself with SIGKILL: no exception handler, finally block or atexit hook runs, as with the OOM killer
or a pulled plug. WINNOW_PAUSEPOINT=<name>:<seconds> sleeps there instead (each pass), so a test can hold a run
at a known place (e.g. to start a second run against it). Unset (always, outside those tests), a failpoint is two
dictionary lookups.
"""
from __future__ import annotations

import os
import signal
import threading
import time

_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    pause = os.environ.get("WINNOW_PAUSEPOINT")
    if pause and pause.partition(":")[0] == name:
        time.sleep(float(pause.partition(":")[2] or 1))
    spec = os.environ.get("WINNOW_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
