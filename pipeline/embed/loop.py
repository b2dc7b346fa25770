"""The batched embedding loop: `embed_refs` runs one shard through an embedder.

A torch DataLoader's workers read, decode and preprocess the images, so the main process only runs the encoder.
Bad items come back from the workers as a status (never an exception), and every ref gets a meta row in ref order.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.decode import STATUS_OK, decode_image, sha1_hex
from pipeline.embed.common import Embedder

log = logging.getLogger(__name__)

# Statuses embed_refs adds to those of pipeline.decode.
STATUS_IO_ERROR = "io_error"  # read_bytes raised (missing file, permission, network)
STATUS_DECODE_ERROR = "decode_error"  # decode_image itself raised (it should not; kept so a bug never kills a run)
STATUS_PREPROCESS_ERROR = "preprocess_error"  # the embedder's preprocess raised on a decoded image


@dataclass
class EmbeddedShard:
    """One shard's result: `meta` has one row per ref in ref order; `embeddings` the rows where `ok_mask` is set."""

    embeddings: np.ndarray
    meta: list[dict[str, Any]]
    ok_mask: np.ndarray
    # seconds: `wait` = the encoder idle waiting for the loader (worker start included), `first_batch` = the part of
    # it before the first batch, `encode` = in encode(); wait − first_batch near 0 means decoding kept up.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return int(self.ok_mask.sum())

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.meta:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


class _RefDataset(Dataset):
    """Reads, decodes and preprocesses one ref per item; failures become a status, never an exception."""

    def __init__(
        self, source: Any, refs: Sequence[Any], preprocess: Callable[[Image.Image], torch.Tensor], max_side: int
    ) -> None:
        self.source, self.refs, self.preprocess, self.max_side = source, refs, preprocess, max_side

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, dict[str, Any]]:
        ref = self.refs[index]
        meta: dict[str, Any] = {
            "uid": ref.uid, "location": ref.location, "label": ref.label, "caption": ref.caption,
            "sha1": None, "width": 0, "height": 0, "status": STATUS_IO_ERROR,  # 0 = unknown, as in DecodeResult
        }
        try:
            data = self.source.read_bytes(ref)
        except Exception as exc:  # OSError in practice; anything else must not kill the worker either
            log.warning("reading %s (%s) failed: %s", ref.uid, ref.location, exc)
            return index, None, meta
        meta["sha1"] = sha1_hex(data)
        try:
            result = decode_image(data, max_side=self.max_side)
        except Exception as exc:
            log.warning("decoding %s raised %s", ref.uid, exc)
            meta["status"] = STATUS_DECODE_ERROR
            return index, None, meta
        meta.update(width=result.width, height=result.height, status=result.status)
        if result.status != STATUS_OK or result.image is None:
            return index, None, meta
        try:
            tensor = self.preprocess(result.image)
        except Exception as exc:
            log.warning("preprocessing %s raised %s", ref.uid, exc)
            meta["status"] = STATUS_PREPROCESS_ERROR
            return index, None, meta
        return index, tensor, meta


def _collate(items: list[tuple[int, torch.Tensor | None, dict[str, Any]]]) -> dict[str, Any]:
    """Keeps every item's meta, stacks only the decodable ones (a dict: DataLoader pins the tensor inside)."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    return {
        "index": [i for i, _, _ in items],
        "meta": [m for _, _, m in items],
        "ok_index": [i for i, _ in ok],
        "pixels": torch.stack([t for _, t in ok]) if ok else None,
    }


def _worker_init(_: int) -> None:
    # torch already gives each worker one intra-op thread; said here too because it is what keeps the
    # workers' tensor ops (ToTensor, Normalize) from competing with the encoder's threads in the main process.
    torch.set_num_threads(1)


def _modules_of(*objects: Any) -> list[str]:
    """The modules defining the classes of `objects` and of the stages inside a torchvision Compose."""
    found: list[str] = []
    for obj in objects:
        for part in [obj, *getattr(obj, "transforms", [])]:
            is_function = isinstance(part, (types.FunctionType, functools.partial))
            module = getattr(part if is_function else type(part), "__module__", None)
            if isinstance(part, functools.partial):
                module = getattr(part.func, "__module__", None)
            if module and module not in found and module != "builtins":
                found.append(module)
    return found


def _worker_context(*shipped: Any) -> multiprocessing.context.BaseContext:
    """Workers start from a clean forkserver process, never by forking this one.

    The caller is often a Prefect task: forking a process that runs Prefect's threads and event loop copies
    their locks and signal handlers into the child (seen here: every forked worker exited with code 1 inside
    a flow run). The server imports, once, what each worker would otherwise import again on every start:
    `__main__` (multiprocessing re-runs the main script in each child unless the server has it), torch, Pillow,
    and the modules whose objects the workers unpickle (`shipped`: the source and the preprocess transform, e.g.
    open_clip). Without that, every embed_refs call paid seconds of imports per worker (measured: 9-12 s to the
    first batch with the CLIP transform on a loaded 2-core machine, 0.4 s with it). The preload list only counts
    when the server starts, i.e. at the first call in a process.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "PIL.Image", "pipeline.embed", *_modules_of(*shipped)])
    return ctx


def embed_refs(
    source: Any,
    refs: Sequence[Any],
    embedder: Embedder,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    max_side: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> EmbeddedShard:
    """Embeds `refs` read from `source`; undecodable items are recorded in meta with their status and skipped.

    `progress`, when given, is called after each batch with the number of refs that batch finished (so a
    `tqdm.update` fits). `pin_memory=None` pins on CUDA. `num_workers=0` decodes in this process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if getattr(embedder, "is_fitted", True) is False:
        raise ValueError(f"embedder {embedder.name!r} is not fitted; fit it (or load its state) before embed_refs")
    n, dim = len(refs), int(embedder.dim)
    device = torch.device(getattr(embedder, "device", "cpu"))
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    if n == 0:
        timings = {"wait": 0.0, "first_batch": 0.0, "encode": 0.0, "total": 0.0}
        return EmbeddedShard(np.zeros((0, dim), np.float32), [], np.zeros(0, bool), timings)

    loader = DataLoader(
        _RefDataset(source, refs, embedder.preprocess, max_side),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context=_worker_context(source, embedder.preprocess) if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,  # a few batches in hand to cover uneven decode times
    )
    out = np.empty((n, dim), np.float32)
    ok_mask = np.zeros(n, bool)
    meta: list[dict[str, Any] | None] = [None] * n
    wait = encode = 0.0
    first: float | None = None
    start = mark = time.perf_counter()
    for batch in loader:
        now = time.perf_counter()
        wait += now - mark
        if first is None:
            first = now - start
        for i, row in zip(batch["index"], batch["meta"]):
            meta[i] = row
        if batch["pixels"] is not None:
            vecs = embedder.encode(batch["pixels"])
            encode += time.perf_counter() - now
            idx = np.asarray(batch["ok_index"])
            if vecs.shape != (len(idx), dim):
                raise RuntimeError(f"embedder {embedder.name!r} returned {vecs.shape} for a batch of {len(idx)} (dim {dim})")
            out[idx] = vecs
            ok_mask[idx] = True
        if progress is not None:
            progress(len(batch["index"]))
        mark = time.perf_counter()
    timings = {"wait": wait, "first_batch": first or 0.0, "encode": encode, "total": time.perf_counter() - start}
    missing = [i for i, row in enumerate(meta) if row is None]
    if missing:  # cannot happen with an in-order DataLoader; guards the row alignment the store relies on
        raise RuntimeError(f"embedding loop lost {len(missing)} refs (first index {missing[0]})")
    rows: list[dict[str, Any]] = meta  # type: ignore[assignment]  (no None left, checked above)
    return EmbeddedShard(embeddings=np.ascontiguousarray(out[ok_mask]), meta=rows, ok_mask=ok_mask, timings=timings)
