"""Real files for the reliability tests: a manifest and an embedding store written by winnow's own writers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.manifest import manifest_parts, write_manifest
from pipeline.store import EmbeddingStore, StoreInfo


def manifest_frame(n: int = 30) -> pl.DataFrame:
    keep = [i % 3 != 0 for i in range(n)]
    return pl.DataFrame(
        {
            "uid": [f"img/{i:04d}.jpg" for i in range(n)],
            "keep": keep,
            "weight": [1.0 if k else 0.0 for k in keep],
            "cluster": [i % 4 for i in range(n)],
            "reason": [None if k else "semdedup" for k in keep],
            "dup_of": [None if k else f"img/{i + 1:04d}.jpg" for i, k in enumerate(keep)],
            "label": [["cat", "dog"][i % 2] for i in range(n)],
            "score_semdedup": [0.5 + i / (2 * n) for i in range(n)],
        }
    )


def write_run(run_dir: Path, n: int = 30, note: str = "first") -> Path:
    """Writes a one-part manifest run; returns its part file (the file the damage tests corrupt)."""
    return manifest_parts(write_manifest(manifest_frame(n), run_dir, {"config": {"name": run_dir.name}, "note": note}))[0]


def meta_rows(uids, statuses, caption_len: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    return [
        {
            "uid": u,
            "location": f"/data/{u}",
            "label": "a",
            "caption": "".join(rng.choice(letters, caption_len)) if caption_len else None,
            "sha1": f"{abs(hash(u)):040x}"[:40],
            "width": 8,
            "height": 8,
            "status": s,
        }
        for u, s in zip(uids, statuses)
    ]


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_store(root: Path, *, n_shards: int = 2, rows: int = 6, dim: int = 8, dtype: str = "float16", seed: int = 0) -> EmbeddingStore:
    """A complete store of n_shards shards; the last row of every shard is a decode failure (status 'corrupt')."""
    rng = np.random.default_rng(seed)
    store = EmbeddingStore(root)
    store.init(StoreInfo(dim=dim, dtype=dtype, embedder={"kind": "test"}, source={"kind": "test"}, shard_size=rows, n_shards=n_shards))
    for shard in range(n_shards):
        uids = [f"s{shard}/{i:03d}" for i in range(rows)]
        statuses = ["ok"] * (rows - 1) + ["corrupt"]
        store.write_shard(shard, unit(rng, rows - 1, dim), meta_rows(uids, statuses))
    return store


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment holds WINNOW_TEST_TAG=<tag> (every process a test's run started
    inherits it: the Prefect server, DataLoader workers, multiprocessing helpers). Linux /proc; [] elsewhere."""
    import os

    wanted = f"WINNOW_TEST_TAG={tag}".encode()
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILLs every process tagged with `tag` (see tagged_processes); returns the pids it found."""
    import os
    import signal

    pids = tagged_processes(tag)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids
