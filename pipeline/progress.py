"""One overall progress display per stage: units done / total, rate and ETA.

A fan-out stage (embedding shards, k-means assignment shards, SemDeDup cluster batches, manifest parts) runs inside
`stage(...)`; work reports with `advance(n)` from any thread (an embedding shard per batch of images), and a call that
reported less than its size is topped up when it returns (a shard already done, or work in a worker process, where
there is no display). The display is one line redrawn on a terminal (stderr), and a line through `log` every
`log_interval_s` seconds and at the end, so the run's logs show it too (inside a Prefect flow run, flows/ installs a
sink that writes the flow run's log and a progress artifact per stage).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("winnow.progress")

# Where periodic progress goes: a factory called with the stage's name when the stage starts (in the flow's thread),
# returning a callable that takes the progress line and the fraction done. Records carry `winnow_progress` so a
# console handler can skip them while the terminal line shows the same thing.
Sink = Callable[[str, float], None]
_sink_factory: Callable[[str], Sink] | None = None
LOG_INTERVAL_S = 15.0
_local = threading.local()


def set_sink_factory(factory: Callable[[str], Sink] | None) -> None:
    global _sink_factory
    _sink_factory = factory


def _plain_log(text: str, fraction: float) -> None:
    log.info(text, extra={"winnow_progress": True})


def _sink(stage_name: str) -> Sink:
    if _sink_factory is not None:
        try:
            return _sink_factory(stage_name)
        except Exception:  # noqa: BLE001 - no run context (a stage outside a flow): plain logging
            pass
    return _plain_log


def terminal_display() -> bool:
    """Whether the redrawn one-line display is used (stderr is a terminal)."""
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StageProgress:
    """Counts units of one stage; thread-safe. `line()` is the human form."""

    def __init__(self, name: str, total: int, unit: str, *, log_interval_s: float = LOG_INTERVAL_S) -> None:
        self.name, self.total, self.unit = name, max(int(total), 0), unit
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last_log = self.started
        self._last_draw = 0.0
        self._log_interval = log_interval_s
        self._tty = terminal_display()
        self._emit = _sink(name)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        text = f"{self.name}: {self.done:,}/{self.total:,} {self.unit}{pct}, {rate:,.1f} {self.unit}/s"
        if self.done >= self.total:
            return text + f", done in {_duration(elapsed)}"
        if self.done and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def advance(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done = min(self.done + int(n), self.total)
            draw = self._tty and now - self._last_draw >= 0.25
            emit = now - self._last_log >= self._log_interval and self.done < self.total  # close() says done
            if draw:
                self._last_draw = now
            if emit:
                self._last_log = now
            text = self.line() if draw or emit else ""
        if draw:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        if emit:
            self._emit(text, self.fraction())

    def close(self) -> None:
        text = self.line()
        if self._tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self._emit(text, self.fraction())


_current: list[StageProgress] = []


@contextmanager
def stage(name: str, total: int, unit: str) -> Iterator[StageProgress]:
    progress = StageProgress(name, total, unit)
    _current.append(progress)
    try:
        yield progress
        progress.done = progress.total
    finally:
        _current.remove(progress)
        progress.close()


def advance(n: int) -> None:
    """Reports n units done in the innermost running stage (no-op outside one, e.g. in a worker process)."""
    if _current:
        _current[-1].advance(n)
        _local.reported = getattr(_local, "reported", 0) + int(n)


class Counted:
    """fn wrapped so that each call counts `size` units when it returns, less what it reported with advance()."""

    def __init__(self, fn: Callable[..., Any], size: Callable[[dict[str, Any]], int]) -> None:
        self.fn, self.size = fn, size
        self.__name__ = getattr(fn, "__name__", "work")

    def __call__(self, **call: Any) -> Any:
        _local.reported = 0
        result = self.fn(**call)
        rest = self.size(call) - getattr(_local, "reported", 0)
        if rest > 0 and _current:
            _current[-1].advance(rest)
        return result

    def __getstate__(self) -> dict[str, Any]:  # crosses into Dask/Ray workers: only fn and size travel
        return {"fn": self.fn, "size": self.size, "__name__": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# How each fan-out's work is counted: (display name, unit, size of one call).
def _refs(call: dict[str, Any]) -> int:
    return len(call.get("refs") or ()) or 1


def _rows(call: dict[str, Any]) -> int:
    return len(call.get("uids")) if call.get("uids") is not None else 1


def _one(call: dict[str, Any]) -> int:
    return 1


STAGES: dict[str, tuple[str, str, Callable[[dict[str, Any]], int]]] = {
    "embed_shard": ("embed", "images", _refs),
    "assign_shard": ("index: assign", "shards", _one),
    "semdedup": ("score: semdedup", "rows", _rows),
}


def counted_fan_out(fn: Callable[..., Any], calls: list[dict[str, Any]], run: Callable[..., list[Any]]) -> list[Any]:
    """`run(fn, calls)` (a fan-out) inside a progress stage named after fn."""
    name = getattr(fn, "__name__", "work")
    label, unit, size = STAGES.get(name, (name.replace("_", " "), "parts", _one))
    total = sum(size(c) for c in calls)
    if total == 0:
        return run(fn, calls)
    with stage(label, total, unit):
        return run(Counted(fn, size), calls)
