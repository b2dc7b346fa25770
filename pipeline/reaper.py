"""No process outlives a `winnow run`, even one killed by SIGKILL or the OOM killer.

A killed process runs no cleanup, so its children (Prefect's temporary server, DataLoader workers, multiprocessing's
forkserver and resource tracker) would be re-parented and keep running. `start_watchdog` starts a small process, in a
session of its own (so a terminal's Ctrl-C or a kill of the run's process group does not end it first), that notes the
run's descendants every `interval_s` seconds and, once the run is gone, ends them: SIGTERM, then SIGKILL after a grace
period. Processes are matched by pid and start time, so a reused pid is never signalled. Linux only (/proc).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc/<pid>/stat; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(roots: set[int], exclude: int | None = None) -> set[Proc]:
    """Every live process below the pids `roots` (not the roots themselves), with its start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append((int(name), st[1]))
    found: set[Proc] = set()
    stack = list(roots)
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid != exclude and (pid, start) not in found:
                found.add((pid, start))
                stack.append(pid)
    return found


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[1]


def _alive(procs: set[Proc]) -> set[Proc]:
    return {(pid, start) for pid, start in procs if (st := _stat(pid)) is not None and st[1] == start}


def end_processes(procs: set[Proc], grace_s: float = 3.0) -> None:
    """SIGTERM each process (and anything it started since), then SIGKILL what is left after `grace_s`."""
    procs = _alive(procs)
    procs |= descendants({pid for pid, _ in procs}, exclude=os.getpid())
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        for pid, _ in _alive(procs):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.05)


def watch(parent: int, interval_s: float = 0.5) -> None:
    """Runs in the watchdog process: follows `parent`'s descendants until it is gone, then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = _start_time(parent)
    known: set[Proc] = set()
    while started is not None and _start_time(parent) == started:
        known = _alive(known) | descendants({parent}, exclude=os.getpid())
        time.sleep(interval_s)
    end_processes(known)


def start_watchdog(interval_s: float = 0.5) -> subprocess.Popen | None:
    """Starts the watchdog for this process; None where /proc is missing (not Linux)."""
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.reaper", str(os.getpid()), str(interval_s)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
