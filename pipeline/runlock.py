"""One run per run directory: an exclusive lock file beside the run's outputs, naming its holder.

`<run_dir>/.run.lock` is held with an OS file lock (flock) for the whole run and holds JSON naming the holder:
flow-run id (when Prefect runs it), host, pid and start time. The OS drops the lock when the holder dies, however
it dies, so a lock is never stuck; the JSON left by a holder that died is how the next run learns that an earlier
run did not finish (it says so and takes over). A second run while the first is alive fails at once with one line
naming the holder: it does not wait, because a scheduled run that queued behind a long manual run would start on
outputs it did not plan for.

flock works between processes of one machine, and across machines on filesystems whose locks are shared (NFSv4,
most cluster filesystems); an object store has no locks and is no place for a run directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".run.lock"


class RunLockedError(ValueError):
    """Another live run holds the run directory."""


@dataclass
class RunLock:
    """A held run-directory lock. `previous` is the holder record of an earlier run that died holding it (or None)."""

    path: Path
    fd: int
    holder: dict[str, Any]
    previous: dict[str, Any] | None

    def release(self) -> None:
        """Removes the lock file and drops the lock (removal first, while still held, so no one locks a dead inode)."""
        if self.fd < 0:
            return
        try:
            if _same_file(self.path, self.fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe(holder: dict[str, Any]) -> str:
    """`flow run <id> (pid N on HOST, since T)` for messages."""
    run = f"flow run {holder['flow_run_id']}" if holder.get("flow_run_id") else "a run outside Prefect"
    return f"{run} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')})"


def acquire(run_dir: str | Path, *, flow_run_id: str | None = None) -> RunLock:
    """Takes the run directory's lock or raises RunLockedError naming the live holder (never waits).

    The returned lock's `previous` is the record a dead holder left (its run did not finish); the caller reports it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for _ in range(20):  # a holder releasing between our open and our flock unlinks the file: open the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(path)
            who = describe(holder) if holder else "another run (starting up)"
            raise RunLockedError(f"run directory {run_dir} is in use by {who}; one run per run directory") from None
        if not _same_file(path, fd):
            os.close(fd)
            continue
        previous = _read_fd(fd)
        holder = {"flow_run_id": flow_run_id, "host": socket.gethostname(), "pid": os.getpid(),
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        return RunLock(path=path, fd=fd, holder=holder, previous=previous)
    raise RunLockedError(f"run directory {run_dir}: could not take {path} (other runs keep starting and ending)")


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_fd(fd: int) -> dict[str, Any] | None:
    size = os.fstat(fd).st_size
    return _parse(os.pread(fd, size, 0)) if size else None


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a reused pid reads as alive: the safe side)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
