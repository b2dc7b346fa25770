"""How a `winnow run` behaves at the terminal: a quieter console (stage progress on one redrawn line), a clean Ctrl-C.

Prefect logs a "Finished in state Completed()" line for every task (one per shard, cluster batch and manifest part);
`setup_console` hides those on the console (they still reach the Prefect API / UI; `-v` keeps them) and starts
Prefect's temporary server in a session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground process group)
then reaches winnow but not the server, so the flow run can still be recorded as stopped before the server is shut down.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import threading
from typing import Any

from pipeline import progress


_interrupted = threading.Event()  # set by the SIGINT handler: what Prefect logs after a Ctrl-C is noise by default


def _on_sigint(signum: int, frame: Any) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


class _ConsoleFilter(logging.Filter):
    def __init__(self, quiet: bool) -> None:
        super().__init__("winnow-console")
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "winnow_progress", False) and progress.terminal_display():
            return False  # the redrawn terminal line shows it
        if not self.quiet or record.levelno >= logging.CRITICAL:
            return True
        if _interrupted.is_set() and record.name.startswith("prefect"):
            return False  # tasks failing as their workers got the same SIGINT, the crash state, the server stopping
        text = str(record.msg)
        if record.name == "prefect.task_runs" and record.levelno < logging.WARNING:
            return not text.startswith("Finished in state")
        # Ctrl-C: winnow prints its own line (what stopped, how to resume)
        return not text.startswith("Crash detected! Execution was aborted by an interrupt signal")


class _DetachedSubprocess:
    """The `subprocess` module as Prefect's server module sees it: Popen starts a new session."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - stands in for subprocess.Popen
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)


def setup_console(*, verbose: bool = False) -> None:
    """Console filter on the root logger's handlers (Prefect's console handler lives there) and Prefect's temporary
    server out of the terminal's process group."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api import server

    ensure_logging_setup()  # Prefect configures logging lazily; its console handler must exist before the filter
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, _ConsoleFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_ConsoleFilter(quiet=not verbose))
    server.subprocess = _DetachedSubprocess()  # type: ignore[assignment]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def drain_prefect(timeout_s: float = 5.0) -> None:
    """Sends Prefect's queued logs and events now, while the temporary server still runs (after a Ctrl-C the
    interpreter's exit would otherwise stop the server first and print connection errors for them)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - best effort: the run has stopped either way
            pass
