"""Embedding throughput: the encoder's bare forward vs winnow's embed_refs end to end, on the same images.

Data: ../shared/data/images/cifar10_subset (700 real 32x32 JPEGs), repeated to reach the requested count.
Models: the tiny open_clip config of tests/conftest.py and ViT-B-32, both with RANDOM weights (no pretrained
weights can be downloaded here; the speed of a forward pass does not depend on the weight values).

For each model:
  bare     encode() on batches preprocessed beforehand: the encoder's own speed, nothing else.
  loader   embed_refs with an encoder that does no work: how fast the workers read, decode and preprocess.
  e2e      embed_refs (DataLoader workers read + decode + preprocess, main process encodes), worker start included
           (the forkserver the workers come from is started once, before timing, as a multi-shard run does).
  e2e_w0   embed_refs with num_workers=0 (decoding in the main process), for comparison.
Each figure is the best of `repeats` alternating rounds (the machine may be shared; all rounds go to the JSON).

    python benchmarks/embed_throughput.py [--tiny-images 2100] [--vit-images 320] [--workers 2] [--batch 64]

Writes benchmarks/results/embed_throughput.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.embed import ClipEmbedder, embed_refs  # noqa: E402
from pipeline.sources import ImageFolderSource, SampleRef  # noqa: E402

DATA = Path(os.environ.get("WINNOW_SHARED_DATA", REPO.parent / "shared" / "data")) / "images" / "cifar10_subset"
TINY_NAME = "winnow-tiny-bench"


def register_tiny() -> str:
    import open_clip

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_CLIP_CONFIG  # the one tiny config the tests use

    path = Path(tempfile.mkdtemp()) / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_NAME


class NullEncoder:
    """Same preprocessing as `inner`, no model: embed_refs with it measures the loader alone."""

    def __init__(self, inner: ClipEmbedder) -> None:
        self.name, self.dim, self.device, self.preprocess = "null", inner.dim, inner.device, inner.preprocess
        self._row = np.zeros(inner.dim, np.float32)
        self._row[0] = 1.0

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        return np.broadcast_to(self._row, (len(batch), self.dim)).copy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "null"}


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def repeated_refs(source: ImageFolderSource, n: int) -> list[SampleRef]:
    base = source.refs()
    reps = -(-n // len(base))
    return [SampleRef(f"{r.uid}#{k}", r.location, r.label, r.caption) for k in range(reps) for r in base][:n]


def bench_model(
    embedder: ClipEmbedder, source: ImageFolderSource, n: int, *, batch: int, workers: int, repeats: int
) -> dict[str, Any]:
    from PIL import Image

    refs = repeated_refs(source, n)
    # bare forward: the same images, decoded and preprocessed beforehand, in the same batches
    tensors = [embedder.preprocess(Image.open(r.location).convert("RGB")) for r in refs]
    batches = [torch.stack(tensors[i : i + batch]) for i in range(0, n, batch)]
    if embedder.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    embedder.encode(batches[0])  # warm-up (allocator, kernels)
    # The worker forkserver starts once per process (seconds: it imports torch, open_clip, ...); a real run pays
    # that on its first shard only, so start it before timing.
    embed_refs(source, refs[: 2 * batch], embedder, batch_size=batch, num_workers=workers)

    def bare() -> None:
        for b in batches:
            embedder.encode(b)

    stalls: dict[int, list[dict[str, float]]] = {}

    def e2e(w: int, enc: Any = embedder) -> None:
        shard = embed_refs(source, refs, enc, batch_size=batch, num_workers=w)
        assert shard.n_ok == n, shard.status_counts()
        if enc is embedder:
            stalls.setdefault(w, []).append(shard.timings)

    out: dict[str, Any] = {"model": embedder.model_name, "device": str(embedder.device), "weights": "random init", "n_images": n,
                           "batch_size": batch, "num_workers": workers}
    cases = {
        "bare": bare,
        "loader": lambda: e2e(workers, NullEncoder(embedder)),
        "e2e": lambda: e2e(workers),
        "e2e_w0": lambda: e2e(0),
    }
    # Rounds alternate the cases so that load from other processes hits them alike; the best round of each is
    # reported (the least disturbed one), all rounds are kept in the JSON.
    # The encoder's CPU seconds per image (this process) are kept too: unlike wall time they move little when other
    # processes share the cores. (Workers are children of the forkserver, so their CPU time is not visible here.)
    times: dict[str, list[float]] = {key: [] for key in cases}
    cpu: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(cpu_seconds() - c0)
    for key, ts in times.items():
        out[f"{key}_img_s"] = round(n / min(ts), 1)
        if key == "bare":
            out["bare_cpu_ms_per_img"] = round(1e3 * min(cpu[key]) / n, 3)
        out[f"{key}_seconds"] = [round(t, 3) for t in ts]
    # Encoder idle time inside the fastest e2e round: waiting for the first batch (worker start + first decode)
    # and waiting afterwards (the loader falling behind the encoder).
    best = stalls[workers][int(np.argmin(times["e2e"]))]
    out["e2e_first_batch_s"] = round(best["first_batch"], 3)
    out["e2e_stall_after_first_s"] = round(best["wait"] - best["first_batch"], 3)
    out["e2e_stall_frac"] = round((best["wait"] - best["first_batch"]) / best["total"], 4)
    out["e2e_over_bare"] = round(out["e2e_img_s"] / out["bare_img_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-images", type=int, default=2100)
    ap.add_argument("--vit-images", type=int, default=320)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiny-repeats", type=int, default=3)
    ap.add_argument("--vit-repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embed_throughput.json")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"data not found: {DATA} (set WINNOW_SHARED_DATA)", file=sys.stderr)
        return 2

    source = ImageFolderSource(DATA)
    torch.manual_seed(0)
    runs = [bench_model(ClipEmbedder(register_tiny(), None, device=args.device), source, args.tiny_images,
                        batch=args.batch, workers=args.workers, repeats=args.tiny_repeats)]
    if not args.skip_vit:
        runs.append(bench_model(ClipEmbedder("ViT-B-32", None, device=args.device), source, args.vit_images,
                                batch=args.batch, workers=args.workers, repeats=args.vit_repeats))
    result = {
        "what": "images/s of the encoder's bare forward vs embed_refs end to end (random-init weights)",
        "data": "cifar10_subset: 700 real 32x32 JPEGs, repeated",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "load_average_1m_at_end": os.getloadavg()[0],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    cols = ["model", "n_images", "bare_img_s", "loader_img_s", "e2e_img_s", "e2e_w0_img_s", "e2e_over_bare",
            "bare_cpu_ms_per_img", "e2e_first_batch_s", "e2e_stall_frac"]
    machine = result["machine"]
    print(f"device: {machine['cuda'] or 'cpu'}, {machine['cpus']} cpus, batch {args.batch}, workers {args.workers}")
    for r in runs:
        print("  ".join(f"{c}={r[c]}" for c in cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
