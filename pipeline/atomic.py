"""Atomic file writes: write to a temporary name in the same directory, flush, rename.

A crash or a full disk mid-write leaves the previous file (or no file) in place, never a truncated one.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `final`; renames it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_group(*finals: str | Path, remove_first: Sequence[str | Path] = ()) -> Iterator[list[Path]]:
    """Temporary paths for several files that are replaced together.

    The block writes every temp file; only when it succeeds are all of them fsynced, then the `remove_first` files
    deleted (e.g. a completion marker that must not vouch for a half-replaced set) and the temps renamed onto their
    finals in the order given. A failure while writing (a full disk, EFBIG, a crash) leaves every previous file
    exactly as it was; the temp names start with "." and end in ".tmp" and are removed on the way out.
    """
    paths = [Path(f) for f in finals]
    tmps = []
    for final in paths:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmps.append(final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for old in remove_first:
            Path(old).unlink(missing_ok=True)
        for tmp, final in zip(tmps, paths):
            os.replace(tmp, final)
        for parent in dict.fromkeys(final.parent for final in paths):
            fsync_dir(parent)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is flushed.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
