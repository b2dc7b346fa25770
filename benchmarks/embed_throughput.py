"""Embedding throughput: preprocessing per core, and the encoder's bare forward vs winnow's embed_refs end to end.

Data:
  cifar      ../shared/data/images/cifar10_subset (700 real 32x32 JPEGs), repeated to reach the requested count.
  photos@WxH the 22 shared photos (../shared/data/images/photos) fitted (crop + resize) to 640x480, 1024x768 and
             2048x1536 and re-encoded as JPEG quality 90: realistic camera-sized inputs.
Models: the tiny open_clip config of tests/conftest.py and ViT-B-32, both with RANDOM weights (no pretrained
weights can be downloaded here; the speed of a forward pass does not depend on the weight values).

Part 1, preprocess per core (one process, one torch thread, no DataLoader): JPEG bytes -> the model's uint8 input
tensor, images/s, for ViT-B-32's 224 px input:
  reference  decode_image (full size) + open_clip's transform (ToTensor + Normalize included), as before #20
  old_worker decode_image (full size) + the split transform (uint8 out; normalisation batched on the device)
  fast       decode_image(cover=224): DCT draft to the smallest scale covering 224, box reduction kept >= 2x the
             input, then the split transform (the `cpu` decode path)
  and, for scale: bare Pillow decode at full size, bare torchvision decode_jpeg.

Part 2, for each model and data set:
  bare     encode() on batches preprocessed beforehand: the encoder's own speed, nothing else.
  loader   embed_refs with an encoder that does no work: how fast the workers read, decode and preprocess.
  e2e      embed_refs (DataLoader workers read + decode + preprocess, main process encodes), worker start included
           (the forkserver the workers come from is started once, before timing, as a multi-shard run does).
  bound    1 / (1/bare + 1/loader): on a CPU the encoder and the loader share the cores, so this is the best the
           pipeline can do there (on a GPU the bound is bare itself).
  encoder_idle = the encoder waiting for batches / e2e time; loader_idle = 1 - worker busy time / (workers x e2e time).
Each figure is the best of `repeats` alternating rounds (the machine may be shared; all rounds go to the JSON).

    nice -n 10 python benchmarks/embed_throughput.py [--tiny-images 2100] [--vit-images 256] [--workers 2] [--batch 64]

Writes benchmarks/results/embed_throughput.json and prints tables.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.decode import decode_image  # noqa: E402
from pipeline.embed import ClipEmbedder, embed_refs  # noqa: E402
from pipeline.sources import ImageFolderSource, SampleRef  # noqa: E402

SHARED = Path(os.environ.get("WINNOW_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "images" / "cifar10_subset"
PHOTOS = SHARED / "images" / "photos"
SIZES = ((640, 480), (1024, 768), (2048, 1536))
TINY_NAME = "winnow-tiny-bench"


def register_tiny() -> str:
    import importlib.util

    import open_clip

    # The one tiny config the tests use, read from tests/conftest.py without putting tests/ on sys.path: the embedding
    # workers' forkserver inherits sys.path, and tests/pipeline would shadow the `pipeline` package there (its preload
    # then failed and every worker imported torch and torchvision itself: seconds per shard).
    spec = importlib.util.spec_from_file_location("winnow_tests_conftest", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    path = Path(tempfile.mkdtemp()) / f"{TINY_NAME}.json"
    path.write_text(json.dumps(conftest.TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_NAME


def realistic_jpegs(out: Path, size: tuple[int, int], quality: int = 90) -> Path:
    """The shared photos fitted to `size` (centre crop + Lanczos resize) and re-encoded as JPEG."""
    from PIL import Image, ImageOps

    folder = out / f"photos_{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(PHOTOS.iterdir()):
        with Image.open(path) as im:
            fitted = ImageOps.fit(im.convert("RGB"), size, Image.Resampling.LANCZOS)
        fitted.save(folder / f"{path.stem}.jpg", "JPEG", quality=quality)
    return folder


class NullEncoder:
    """Same preprocessing and decode path as `inner`, no model: embed_refs with it measures the loader alone."""

    def __init__(self, inner: ClipEmbedder) -> None:
        self.name, self.dim, self.device, self.preprocess = "null", inner.dim, inner.device, inner.preprocess
        self.decode_path, self.decode_cover, self.input_size = inner.decode_path, inner.decode_cover, inner.input_size
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


# ---------------------------------------------------------------------------------------------------------------- part 1
def rate(fn: Callable[[bytes], Any], datas: list[bytes], *, min_seconds: float, repeats: int) -> tuple[float, list[float]]:
    """Best images/s of `fn` over the images, looped until `min_seconds`, in `repeats` rounds."""
    rates = []
    for _ in range(repeats):
        done, t0 = 0, time.perf_counter()
        while True:
            for d in datas:
                fn(d)
            done += len(datas)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        rates.append(done / elapsed)
    return max(rates), [round(r, 1) for r in rates]


def bench_preprocess(folders: dict[str, Path], vit: ClipEmbedder, *, min_seconds: float, repeats: int) -> list[dict[str, Any]]:
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    ref_tf, split_tf, cover = vit.reference_preprocess, vit.preprocess, vit.input_size
    cases: dict[str, Callable[[bytes], Any]] = {
        "reference": lambda d: ref_tf(decode_image(d).image),
        "old_worker": lambda d: split_tf(decode_image(d).image),
        "fast": lambda d: split_tf(decode_image(d, cover=cover).image),
        "pil_decode": lambda d: Image.open(io.BytesIO(d)).convert("RGB"),
        "tv_decode_jpeg": lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB),
    }
    rows = []
    for label, folder in folders.items():
        datas = [p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".jpg"]
        row: dict[str, Any] = {"data": label, "n_files": len(datas), "model_input": cover}
        # alternate the cases round by round, so load from other processes hits them alike
        best: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for key, fn in cases.items():
                r, _ = rate(fn, datas, min_seconds=min_seconds, repeats=1)
                best[key].append(round(r, 1))
        for key, rs in best.items():
            row[f"{key}_img_s"] = max(rs)
            row[f"{key}_rounds"] = rs
        row["fast_over_reference"] = round(row["fast_img_s"] / row["reference_img_s"], 2)
        rows.append(row)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return rows


# ---------------------------------------------------------------------------------------------------------------- part 2
def bench_model(
    embedder: ClipEmbedder, source: ImageFolderSource, data_label: str, n: int, *, batch: int, workers: int, repeats: int
) -> dict[str, Any]:
    refs = repeated_refs(source, n)
    # bare forward: the same images, decoded and preprocessed beforehand (the same decode path), in the same batches
    tensors = []
    for r in refs[: len(source.refs())]:
        res = decode_image(source.read_bytes(r), cover=embedder.decode_cover)
        tensors.append(embedder.preprocess(res.image))
    tensors = [tensors[i % len(tensors)] for i in range(n)]
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

    out: dict[str, Any] = {"model": embedder.model_name, "data": data_label, "decode": embedder.decode_path,
                           "device": str(embedder.device), "weights": "random init", "n_images": n,
                           "batch_size": batch, "num_workers": workers}
    cases = {"bare": bare, "loader": lambda: e2e(workers, NullEncoder(embedder)), "e2e": lambda: e2e(workers)}
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
        out[f"{key}_seconds"] = [round(t, 3) for t in ts]
    out["bare_cpu_ms_per_img"] = round(1e3 * min(cpu["bare"]) / n, 3)
    bound = 1.0 / (1.0 / out["bare_img_s"] + 1.0 / out["loader_img_s"])
    out["cpu_sharing_bound_img_s"] = round(bound, 1)
    out["e2e_over_bound"] = round(out["e2e_img_s"] / bound, 3)
    out["e2e_over_bare"] = round(out["e2e_img_s"] / out["bare_img_s"], 3)
    best = stalls[workers][int(np.argmin(times["e2e"]))]
    out["e2e_first_batch_s"] = round(best["first_batch"], 3)
    out["encoder_idle_frac"] = round(best["wait"] / best["total"], 4)
    out["encoder_idle_after_first_frac"] = round((best["wait"] - best["first_batch"]) / best["total"], 4)
    out["loader_idle_frac"] = round(max(0.0, 1.0 - best["loader_busy"] / (max(workers, 1) * best["total"])), 4)
    # batches the encoder ran on the cores the workers leave (pipeline.embed.loop.CpuThreadShare: the loader was slower)
    out["e2e_batches_on_shared_threads"] = int(best.get("batches_on_shared_threads", 0))
    out["e2e_batches"] = -(-n // batch)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-images", type=int, default=2100)
    ap.add_argument("--photo-images", type=int, default=440, help="images per e2e run on the 1024x768 photos")
    ap.add_argument("--vit-images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vit-repeats", type=int, default=2)
    ap.add_argument("--preprocess-seconds", type=float, default=1.5, help="per case and round in part 1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--parts", default="preprocess,e2e",
                    help="which parts to run; a part not run keeps its figures from an existing --out file")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "embed_throughput.json")
    args = ap.parse_args(argv)
    if not CIFAR.is_dir() or not PHOTOS.is_dir():
        print(f"data not found under {SHARED} (set WINNOW_SHARED_DATA)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="winnow-bench-"))
    folders = {f"photos@{w}x{h}": realistic_jpegs(tmp, (w, h)) for w, h in SIZES}
    torch.manual_seed(0)
    vit = ClipEmbedder("ViT-B-32", None, device=args.device, decode="cpu")
    parts = set(args.parts.split(","))
    earlier = json.loads(args.out.read_text()) if args.out.is_file() and parts != {"preprocess", "e2e"} else {}
    preprocess = earlier.get("preprocess_per_core", [])
    if "preprocess" in parts:
        preprocess = bench_preprocess(folders, vit, min_seconds=args.preprocess_seconds, repeats=args.repeats)
        load_after_preprocess = os.getloadavg()[0]
    else:
        load_after_preprocess = earlier.get("load_average_1m_after_preprocess")

    tiny = ClipEmbedder(register_tiny(), None, device=args.device, decode="auto")
    cifar, photos = ImageFolderSource(CIFAR), ImageFolderSource(folders["photos@1024x768"])
    runs = earlier.get("runs", [])
    if "e2e" in parts:
        runs = [
            bench_model(tiny, cifar, "cifar", args.tiny_images, batch=args.batch, workers=args.workers, repeats=args.repeats),
            bench_model(tiny, photos, "photos@1024x768", args.photo_images, batch=args.batch, workers=args.workers,
                        repeats=args.repeats),
        ]
    if "e2e" in parts and not args.skip_vit:
        vit_auto = ClipEmbedder("ViT-B-32", None, device=args.device, decode="auto")
        for label, src in (("cifar", cifar), ("photos@1024x768", photos)):
            runs.append(bench_model(vit_auto, src, label, args.vit_images, batch=args.batch, workers=args.workers,
                                    repeats=args.vit_repeats))
    result = {
        "what": "preprocess images/s per core; images/s of the encoder's bare forward vs embed_refs end to end (random-init weights)",
        "contention": "the machine is shared by other jobs while this runs: absolute figures are inflated by them; "
                      "compare the figures of one run side by side (cases alternate round by round)",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "load_average_1m_after_preprocess": load_after_preprocess,
        "load_average_1m_at_end": os.getloadavg()[0] if "e2e" in parts else earlier.get("load_average_1m_at_end"),
        "preprocess_per_core": preprocess,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"device: {result['machine']['cuda'] or 'cpu'}, {result['machine']['cpus']} cpus, batch {args.batch}, "
          f"workers {args.workers}, load average {result['load_average_1m_after_preprocess']} after part 1, {result['load_average_1m_at_end']} at the end (shared machine)")
    pcols = ["data", "reference_img_s", "old_worker_img_s", "fast_img_s", "pil_decode_img_s", "tv_decode_jpeg_img_s",
             "fast_over_reference"]
    for r in preprocess:
        print("  ".join(f"{c}={r[c]}" for c in pcols))
    cols = ["model", "data", "decode", "bare_img_s", "loader_img_s", "e2e_img_s", "cpu_sharing_bound_img_s",
            "e2e_over_bound", "e2e_over_bare", "encoder_idle_frac", "loader_idle_frac"]
    for r in runs:
        print("  ".join(f"{c}={r[c]}" for c in cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
