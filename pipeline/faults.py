"""Failpoints: named places where a test can SIGKILL the running process, to prove that a rerun recovers.

Set WINNOW_FAILPOINT=<name>[:<n>] and the n-th time (default the first) the process passes `failpoint(name)`
it kills itself with SIGKILL: no exception handler, finally block or atexit hook runs, as with the OOM killer
or a pulled plug. Unset (always, outside the crash tests), a failpoint is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import threading

_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
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
