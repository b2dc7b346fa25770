"""The batched embedding loop: `embed_refs` runs one shard through an embedder.

A torch DataLoader's workers read, decode and preprocess the images, so the main process only runs the encoder.
Bad items come back from the workers as a status (never an exception), and every ref gets a meta row in ref order.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.decode import STATUS_OK, decode_image, peek_jpeg, sha1_hex
from pipeline.embed.common import Embedder
from pipeline.sources import RefusedFileError

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
    # it before the first batch, `encode` = in encode() (GPU decode included); wait − first_batch near 0 means
    # decoding kept up.
    timings: dict[str, float] = field(default_factory=dict)
    # Per-ref statistics from `embed_refs(image_stats=...)`, aligned with `meta` (None where the image did not
    # decode, or when no function was given).
    stats: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return int(self.ok_mask.sum())

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.meta:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


@dataclass(frozen=True)
class DecodePlan:
    """How the workers decode, from the embedder: `cover` (the model's input side: decode no larger than needed;
    None = full size up to `max_side`) and `jpeg_to_device` (JPEGs go to the main process as bytes for nvJPEG)."""

    max_side: int = 4096
    max_pixels: int | None = None
    cover: int | None = None
    jpeg_to_device: bool = False


@dataclass
class WorkerItem:
    """What a worker returns for one ref. Exactly one of `pixels` (the preprocessed tensor) and `jpeg` (bytes for
    the device decoder, with their EXIF `orientation`) is set when the status is ok; neither otherwise."""

    index: int
    meta: dict[str, Any]
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None
    orientation: int = 1
    stats: dict[str, float] | None = None


def available_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-limited sets included, where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _RefDataset(Dataset):
    """Reads, decodes and preprocesses one ref per item; failures become a status, never an exception."""

    def __init__(
        self, source: Any, refs: Sequence[Any], preprocess: Callable[[Image.Image], torch.Tensor], plan: DecodePlan,
        image_stats: Callable[..., dict[str, float]] | None = None,
    ) -> None:
        self.source, self.refs, self.preprocess, self.plan, self.image_stats = source, refs, preprocess, plan, image_stats

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> WorkerItem:
        start = time.perf_counter()
        item = self._item(index)
        item.meta["_seconds"] = time.perf_counter() - start  # loader busy time; popped by embed_refs
        return item

    def _item(self, index: int) -> WorkerItem:
        ref = self.refs[index]
        item = WorkerItem(index, {
            "uid": ref.uid, "location": ref.location, "label": ref.label, "caption": ref.caption,
            "sha1": None, "width": 0, "height": 0, "status": STATUS_IO_ERROR,  # 0 = unknown, as in DecodeResult
        })
        try:
            data = self.source.read_bytes(ref)
        except Exception as exc:  # OSError in practice; anything else must not kill the worker either
            log.warning("reading %s (%s) failed: %s", ref.uid, ref.location, exc)
            if isinstance(exc, RefusedFileError):  # not_regular_file, too_large, outside_root
                item.meta["status"] = exc.status
            return item
        item.meta["sha1"] = sha1_hex(data)  # from the bytes in hand: no second read
        if self.plan.jpeg_to_device:
            header = peek_jpeg(data, max_pixels=self.plan.max_pixels)
            if header is not None:
                swap = header.orientation in (5, 6, 7, 8)
                item.meta.update(width=header.height if swap else header.width,
                                 height=header.width if swap else header.height, status=STATUS_OK)
                item.jpeg, item.orientation = torch.frombuffer(bytearray(data), dtype=torch.uint8), header.orientation
                return item
        return _decode_on_cpu(item, data, self.preprocess, self.plan, self.image_stats)


def _decode_on_cpu(
    item: WorkerItem, data: bytes, preprocess: Callable[[Image.Image], torch.Tensor], plan: DecodePlan,
    image_stats: Callable[..., dict[str, float]] | None,
) -> WorkerItem:
    """decode_image + preprocess into `item` (status, size, pixels, stats); used by workers and the nvJPEG fallback."""
    uid = item.meta["uid"]
    try:
        result = decode_image(data, max_side=plan.max_side, max_pixels=plan.max_pixels, cover=plan.cover)
    except Exception as exc:
        log.warning("decoding %s raised %s", uid, exc)
        item.meta["status"] = STATUS_DECODE_ERROR
        return item
    item.meta.update(width=result.width, height=result.height, status=result.status)
    if result.status != STATUS_OK or result.image is None:
        return item
    try:
        item.pixels = preprocess(result.image)
    except Exception as exc:
        log.warning("preprocessing %s raised %s", uid, exc)
        item.meta["status"] = STATUS_PREPROCESS_ERROR
        return item
    if image_stats is not None:
        item.stats = _stats(image_stats, result.image, len(data), result.width, result.height, uid)
    return item


def _stats(fn: Callable[..., dict[str, float]], image: Any, n_bytes: int, width: int, height: int, uid: str
           ) -> dict[str, float] | None:
    try:
        return fn(image, n_bytes=n_bytes, width=width, height=height)
    except Exception as exc:  # statistics must never cost an image its embedding
        log.warning("image statistics of %s raised %s", uid, exc)
        return None


def _collate(items: list[WorkerItem]) -> dict[str, Any]:
    """Keeps every item's meta, stacks the preprocessed tensors, lists the JPEGs for the device decoder
    (a dict: DataLoader pins the tensors inside)."""
    ok = [it for it in items if it.pixels is not None]
    jpegs = [it for it in items if it.jpeg is not None]
    return {
        "index": [it.index for it in items],
        "meta": [it.meta for it in items],
        "stats": [it.stats for it in items],
        "ok_index": [it.index for it in ok],
        "pixels": torch.stack([it.pixels for it in ok]) if ok else None,
        "jpeg_index": [it.index for it in jpegs],
        "jpeg": [it.jpeg for it in jpegs],
        "jpeg_orientation": [it.orientation for it in jpegs],
    }


def _worker_init(_: int) -> None:
    # torch already gives each worker one intra-op thread; said here too because it is what keeps the
    # workers' tensor ops (ToTensor, Normalize) from competing with the encoder's threads in the main process.
    torch.set_num_threads(1)
    # A terminal's Ctrl-C reaches the whole process group: the workers leave it to the main process, which stops the
    # run and ends them; a worker dying of it first would fail its shard's task before the stop is known.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _modules_of(*objects: Any) -> list[str]:
    """The modules defining the classes of `objects` and of the stages inside a torchvision Compose, and those an
    object says it imports when called (`worker_imports`)."""
    found: list[str] = []
    for obj in objects:
        for part in [obj, *getattr(obj, "transforms", [])]:
            is_function = isinstance(part, (types.FunctionType, functools.partial))
            module = getattr(part if is_function else type(part), "__module__", None)
            if isinstance(part, functools.partial):
                module = getattr(part.func, "__module__", None)
            for name in [module, *getattr(part, "worker_imports", ())]:
                if name and name not in found and name != "builtins":
                    found.append(name)
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
    ctx.set_forkserver_preload(worker_preload(*shipped))
    return ctx


def worker_preload(*shipped: Any) -> list[str]:
    """The modules the workers' forkserver imports once, in order: everything a worker needs for its first item
    (tests/pipeline/test_worker_imports.py checks that a worker imports nothing more)."""
    # worker_group first: it moves the server, and so every worker, out of the terminal's process group (see there)
    return ["pipeline.embed.worker_group", "__main__", "torch", "PIL.Image", "pipeline.embed", *_modules_of(*shipped)]


class CpuThreadShare:
    """On a CPU device the encoder (this process's torch threads) and the decode workers share the cores.

    While the encoder waits for batches (the loader is the slower side: a small model, large JPEGs) it runs on the
    cores the workers leave, `available_cpus() - num_workers` threads (at least 1), so its threads do not compete with
    the workers for the same cores; when batches are waiting for it (a large model) it takes every thread again.
    Measured on the shared 2-core machine (load 3.5-4.7), tiny model on 2,100 CIFAR JPEGs, 2 workers, 3 alternating
    rounds: end to end 203-227 img/s with the share vs 134-189 without (over the sharing bound 0.80-1.01 vs 0.71-0.74).
    The thread count is restored on exit.
    """

    def __init__(self, device: torch.device, num_workers: int) -> None:
        self.full = torch.get_num_threads()
        self.shared = max(1, available_cpus() - num_workers)
        self.active = device.type == "cpu" and num_workers > 0 and self.shared < self.full
        self.current = self.full
        self.shared_batches = 0  # batches encoded on the shared thread count (in EmbeddedShard.timings)

    def after_batch(self, *, waited: float, encoded: float) -> None:
        """`waited`: seconds the encoder waited for this batch; `encoded`: seconds it spent on the previous one."""
        if not self.active:
            return
        want = self.shared if waited > max(1e-3, 0.1 * encoded) else self.full
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want
        self.shared_batches += want == self.shared

    def restore(self) -> None:
        if self.active and self.current != self.full:
            torch.set_num_threads(self.full)
            self.current = self.full


def embed_refs(
    source: Any,
    refs: Sequence[Any],
    embedder: Embedder,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    max_side: int = 4096,
    max_pixels: int | None = None,
    image_stats: Callable[..., dict[str, float]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EmbeddedShard:
    """Embeds `refs` read from `source`; undecodable items are recorded in meta with their status and skipped.

    The decode path is the embedder's (`decode_path`, `decode_cover`, see pipeline.embed.device_decode).
    `num_workers=None` uses every available CPU; 0 decodes in this process. `pin_memory=None` pins on CUDA.
    `max_pixels` caps the pixels decoded per image (None: pipeline.decode's default). `image_stats`, when given, is
    called as `image_stats(image, n_bytes=, width=, height=)` on each decoded image (RGB, as decoded for the model;
    for nvJPEG-decoded JPEGs the model-size crop) and its dicts come back in `EmbeddedShard.stats`.
    `progress`, when given, is called after each batch with the number of refs that batch finished (so a
    `tqdm.update` fits).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = available_cpus()
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if getattr(embedder, "is_fitted", True) is False:
        raise ValueError(f"embedder {embedder.name!r} is not fitted; fit it (or load its state) before embed_refs")
    n, dim = len(refs), int(embedder.dim)
    device = torch.device(getattr(embedder, "device", "cpu"))
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    if n == 0:
        timings = {"wait": 0.0, "first_batch": 0.0, "encode": 0.0, "device_decode": 0.0, "loader_busy": 0.0, "total": 0.0,
                   "batches_on_shared_threads": 0.0}
        return EmbeddedShard(np.zeros((0, dim), np.float32), [], np.zeros(0, bool), timings)
    plan = DecodePlan(max_side=max_side, max_pixels=max_pixels, cover=getattr(embedder, "decode_cover", None),
                      jpeg_to_device=getattr(embedder, "decode_path", None) == "nvjpeg")

    loader = DataLoader(
        _RefDataset(source, refs, embedder.preprocess, plan, image_stats),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context=_worker_context(source, embedder.preprocess, image_stats) if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,  # a few batches in hand to cover uneven decode times
    )
    out = np.empty((n, dim), np.float32)
    ok_mask = np.zeros(n, bool)
    meta: list[dict[str, Any] | None] = [None] * n
    stats: list[dict[str, float] | None] = [None] * n
    wait = encode = device_decode = loader_busy = 0.0
    first: float | None = None
    share = CpuThreadShare(device, num_workers)
    batch_encode = 0.0
    start = mark = time.perf_counter()
    try:
        for batch in loader:
            now = time.perf_counter()
            wait += now - mark
            if first is None:
                first = now - start
            else:  # the first wait is the workers' start, not a sign of who is slower
                share.after_batch(waited=now - mark, encoded=batch_encode)
            batch_encode = 0.0
            for i, row, st in zip(batch["index"], batch["meta"], batch["stats"]):
                meta[i], stats[i] = row, st
                loader_busy += row.pop("_seconds", 0.0)
            idx = list(batch["ok_index"])
            parts = [] if batch["pixels"] is None else [batch["pixels"].to(device, non_blocking=True)]
            if batch["jpeg"]:
                t0 = time.perf_counter()
                gpu_idx, gpu_pixels = _device_decode(batch, embedder, plan, meta, stats, image_stats)
                device_decode += time.perf_counter() - t0
                idx += gpu_idx
                parts += gpu_pixels
            if idx:
                t0 = time.perf_counter()
                vecs = embedder.encode(parts[0] if len(parts) == 1 else torch.cat(parts))
                batch_encode = time.perf_counter() - t0
                encode += batch_encode
                if vecs.shape != (len(idx), dim):
                    raise RuntimeError(f"embedder {embedder.name!r} returned {vecs.shape} for a batch of {len(idx)} (dim {dim})")
                out[idx] = vecs
                ok_mask[idx] = True
            if progress is not None:
                progress(len(batch["index"]))
            mark = time.perf_counter()
    finally:
        share.restore()
    timings = {"wait": wait, "first_batch": first or 0.0, "encode": encode, "device_decode": device_decode,
               "loader_busy": loader_busy, "total": time.perf_counter() - start,
               "batches_on_shared_threads": float(share.shared_batches)}
    missing = [i for i, row in enumerate(meta) if row is None]
    if missing:  # cannot happen with an in-order DataLoader; guards the row alignment the store relies on
        raise RuntimeError(f"embedding loop lost {len(missing)} refs (first index {missing[0]})")
    rows: list[dict[str, Any]] = meta  # type: ignore[assignment]  (no None left, checked above)
    return EmbeddedShard(embeddings=np.ascontiguousarray(out[ok_mask]), meta=rows, ok_mask=ok_mask, timings=timings,
                         stats=stats)


def _device_decode(
    batch: dict[str, Any], embedder: Any, plan: DecodePlan, meta: list[dict[str, Any] | None],
    stats: list[dict[str, float] | None], image_stats: Callable[..., dict[str, float]] | None,
) -> tuple[list[int], list[torch.Tensor]]:
    """The batch's JPEGs decoded and resized on the embedder's device; any the decoder refuses go through the CPU
    path here (so their status is decode_image's). Returns (ref indices, (1, 3, S, S) uint8 tensors) of the ok ones."""
    from pipeline.embed.device_decode import decode_jpegs, orient, resize_center_crop

    device = torch.device(embedder.device)
    decoded = decode_jpegs(batch["jpeg"], device)
    idx: list[int] = []
    pixels: list[torch.Tensor] = []
    for i, data, orientation, img in zip(batch["jpeg_index"], batch["jpeg"], batch["jpeg_orientation"], decoded):
        row = meta[i]
        assert row is not None
        if img is None:  # refused on the device: the CPU decides (ok, or corrupt with Pillow's verdict)
            item = _decode_on_cpu(WorkerItem(i, row), data.numpy().tobytes(), embedder.preprocess, plan, image_stats)
            stats[i] = item.stats
            if item.pixels is not None:
                idx.append(i)
                pixels.append(item.pixels.unsqueeze(0).to(device))
            continue
        crop = resize_center_crop(orient(img, orientation), embedder.input_size)
        idx.append(i)
        pixels.append(crop.unsqueeze(0))
        if image_stats is not None:
            hwc = crop.permute(1, 2, 0).cpu().numpy()
            stats[i] = _stats(image_stats, hwc, int(data.numel()), row["width"], row["height"], row["uid"])
    return idx, pixels
