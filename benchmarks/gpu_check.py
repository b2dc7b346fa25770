"""One command that measures winnow's GPU paths on the first CUDA machine it meets, in under 5 minutes; one JSON out.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget-s 270]

Parts (each recorded with its figures, or `skipped` and the reason, or `error` and the message):
  encoders   ViT-B-32 and ViT-L-14 (RANDOM weights: speed does not depend on the weight values), bf16 autocast:
             bare forward img/s on preprocessed batches, and embed_refs end to end on realistic JPEGs (the shared photos
             fitted to 1024x768, JPEG q90, repeated) with the nvJPEG decode path and with the CPU decode path
             (workers = every available CPU); e2e / bare for each, encoder idle fraction.
  kmeans     faiss spherical k-means on 1M x 768 random unit rows (k = 1000, 20 iterations) with faiss-gpu.
  semdedup   scorers.semdedup.semdedup_cluster on ONE cluster of 100k x 768 rows on the GPU (n²/2 similarities in
             fp32, column-batched): seconds.
Without CUDA every CUDA part is skipped with its reason, and small CPU versions of the same code paths run instead
(`cpu_smoke`: tiny model, 20k-row k-means, 5k-row cluster) so the script itself is known to work before a GPU is lent.
The JSON is rewritten after every part: a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embed_throughput import NullEncoder, realistic_jpegs, register_tiny, repeated_refs  # noqa: E402

from pipeline.decode import decode_image  # noqa: E402
from pipeline.embed import ClipEmbedder, embed_refs  # noqa: E402
from pipeline.embed.device_decode import nvjpeg_available  # noqa: E402
from pipeline.embed.loop import available_cpus  # noqa: E402
from pipeline.sources import ImageFolderSource  # noqa: E402


class Check:
    """Runs parts against a time budget, recording each into one JSON file written after every part."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.result: dict[str, Any] = {"machine": machine(), "parts": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def part(self, name: str, fn: Callable[[], dict[str, Any]], *, skip: str | None = None, need_s: float = 0) -> None:
        if skip is None and self.left() < need_s:
            skip = f"time budget: {self.left():.0f} s left, the part needs about {need_s:.0f} s"
        t0 = time.perf_counter()
        if skip is not None:
            entry: dict[str, Any] = {"skipped": skip}
        else:
            try:
                entry = fn()
            except Exception as exc:  # one broken part must not lose the others' figures
                entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
        entry["part_seconds"] = round(time.perf_counter() - t0, 2)
        self.result["parts"][name] = entry
        self.result["total_seconds"] = round(time.perf_counter() - self.start, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=2) + "\n")
        print(f"{name}: {json.dumps({k: v for k, v in entry.items() if k != 'traceback'})}", flush=True)


def machine() -> dict[str, Any]:
    import faiss

    cuda = torch.cuda.is_available()
    return {
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cpus_available": available_cpus(),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "faiss_gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)()),
        "nvjpeg": nvjpeg_available("cuda"),
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_part(model: str, folder: Path, *, n: int, batch: int, workers: int, device: str) -> dict[str, Any]:
    """Bare bf16 forward vs embed_refs end to end with each available decode path, on the same images."""
    torch.manual_seed(0)
    source = ImageFolderSource(folder)
    refs = repeated_refs(source, n)
    paths = ["nvjpeg", "cpu"] if torch.device(device).type == "cuda" and nvjpeg_available("cuda") else ["cpu"]
    out: dict[str, Any] = {"model": model, "weights": "random init", "n_images": n, "batch_size": batch,
                           "num_workers": workers, "data": folder.name}
    for path in paths:
        emb = ClipEmbedder(model, None, device=device, decode=path)
        out["precision"] = emb.describe()["precision"]
        if "bare_img_s" not in out:
            base = [emb.preprocess(decode_image(source.read_bytes(r), cover=emb.decode_cover).image) for r in source.refs()]
            batches = [torch.stack([base[(i + j) % len(base)] for j in range(min(batch, n - i))]) for i in range(0, n, batch)]
            if emb.device.type == "cuda":
                batches = [b.pin_memory() for b in batches]
            emb.encode(batches[0])
            _sync(emb.device)
            t0 = time.perf_counter()
            for b in batches:
                emb.encode(b)
            _sync(emb.device)
            out["bare_img_s"] = round(n / (time.perf_counter() - t0), 1)
        embed_refs(source, refs[: 2 * batch], emb, batch_size=batch, num_workers=workers)  # forkserver + warm-up
        t0 = time.perf_counter()
        loader = embed_refs(source, refs, NullEncoder(emb), batch_size=batch, num_workers=workers)
        out[f"{path}_loader_img_s"] = round(n / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        shard = embed_refs(source, refs, emb, batch_size=batch, num_workers=workers)
        _sync(emb.device)
        seconds = time.perf_counter() - t0
        assert shard.n_ok == n and loader.n_ok == n, shard.status_counts()
        t = shard.timings
        out[f"{path}_e2e_img_s"] = round(n / seconds, 1)
        out[f"{path}_e2e_over_bare"] = round(out[f"{path}_e2e_img_s"] / out["bare_img_s"], 3)
        out[f"{path}_encoder_idle_frac"] = round(t["wait"] / t["total"], 4)
        out[f"{path}_device_decode_s"] = round(t["device_decode"], 3)
        del emb
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def kmeans_part(n: int, d: int, k: int, *, gpu: bool) -> dict[str, Any]:
    from pipeline.index import KMeansParams, spherical_kmeans

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    res = spherical_kmeans(x, KMeansParams(k=k, niter=20), use_gpu=gpu)
    return {"n": n, "d": d, "k": k, "niter": 20, "used_gpu": res.used_gpu, "seconds_fit_and_assign": round(time.perf_counter() - t0, 2)}


def semdedup_part(n: int, d: int, *, device: str) -> dict[str, Any]:
    from scorers.semdedup import semdedup_cluster

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x[n // 2 :] = x[: n - n // 2] + 0.01 * rng.standard_normal((n - n // 2, d), dtype=np.float32)  # planted near-dups
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = np.arange(n)
    semdedup_cluster(x[:2048], order=np.arange(2048), device=device)  # warm-up
    t0 = time.perf_counter()
    max_sim, _ = semdedup_cluster(x, order=order, device=device)
    seconds = time.perf_counter() - t0
    found = float((max_sim[n // 2 :] > 1 - 0.01).mean())
    return {"n": n, "d": d, "device": device, "seconds": round(seconds, 2), "pairs_per_s": round(n * (n - 1) / 2 / seconds),
            "planted_duplicates_found_at_eps_0.01": round(found, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=270.0, help="parts that would not fit are skipped, with the reason")
    ap.add_argument("--images", type=int, default=2048, help="images per e2e run on the GPU")
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("WINNOW_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (shared / "images" / "photos").is_dir():
        print(f"data not found under {shared} (set WINNOW_SHARED_DATA)", file=sys.stderr)
        return 2
    check = Check(args.out, args.budget_s)
    cuda = torch.cuda.is_available()
    no_cuda = None if cuda else "no CUDA device (torch.cuda.is_available() is False)"
    folder = realistic_jpegs(Path(tempfile.mkdtemp(prefix="winnow-gpu-check-")), (1024, 768))
    workers = available_cpus()
    import faiss

    faiss_gpu = cuda and int(getattr(faiss, "get_num_gpus", lambda: 0)()) > 0
    check.part("vit_b_32", lambda: encoder_part("ViT-B-32", folder, n=args.images, batch=256, workers=workers, device="cuda"),
               skip=no_cuda, need_s=40)
    check.part("vit_l_14", lambda: encoder_part("ViT-L-14", folder, n=args.images, batch=128, workers=workers, device="cuda"),
               skip=no_cuda, need_s=60)
    check.part("kmeans_1m_768", lambda: kmeans_part(1_000_000, 768, 1000, gpu=True),
               skip=no_cuda or (None if faiss_gpu else "faiss has no GPU support here (faiss-cpu, or no GPU visible to faiss)"),
               need_s=60)
    check.part("semdedup_100k_cluster", lambda: semdedup_part(100_000, 768, device="cuda"), skip=no_cuda, need_s=30)
    if not cuda:  # the same code paths, small, on the CPU: the script is known to run before a GPU is lent
        tiny = register_tiny()
        check.part("cpu_smoke_encoder", lambda: encoder_part(tiny, folder, n=128, batch=32, workers=min(2, workers),
                                                             device="cpu"))
        check.part("cpu_smoke_kmeans", lambda: kmeans_part(20_000, 768, 50, gpu=False))
        check.part("cpu_smoke_semdedup", lambda: semdedup_part(5_000, 768, device="cpu"))
    print(f"wrote {args.out} in {check.result['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
