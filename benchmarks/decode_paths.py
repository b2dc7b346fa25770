"""How much the fast decode paths change embeddings: cosine between each path's embedding and the reference path's.

Reference = full-size decode + open_clip's own transform (`embed.decode: reference`). Fast CPU = DCT draft to the
smallest scale covering the model input + box reduction (reducing_gap 2) + bicubic resize on the uint8 tensor
(`embed.decode: cpu`, the default without CUDA). Device = the nvJPEG path's code (batched decode_jpeg, resize on the
tensor) run here with torchvision's CPU JPEG decoder in place of nvJPEG: the same resize and orientation code, another
decoder (nvJPEG itself needs a GPU; benchmarks/gpu_check.py measures it when one is lent).

Data: the 22 shared photos as they are (PNG and JPEG, 172..1411 px), the same photos fitted to 640x480, 1024x768 and
2048x1536 and re-encoded as JPEG q90, and the 700 CIFAR-10 JPEGs (32 px: smaller than any model input, so no path
shrinks them; their cosine shows the paths agree where nothing is drafted).
Models (RANDOM weights; no pretrained weights can be downloaded here): ViT-B-32 (224 px input) and the tiny test
config (64 px input). Random-weight embeddings are sensitive to pixel changes (nothing in them is trained to be
invariant), so these cosines are a conservative check.

SemDeDup agreement: on the 1024x768 photos plus planted near-duplicates (each photo re-encoded at q60, and a 2 px crop
resized back), SemDeDup (one cluster, keep hard) at several eps on each path's ViT-B-32 embeddings; reported: the
fraction of rows with the same duplicate decision as the reference path.

    nice -n 10 python benchmarks/decode_paths.py   # writes benchmarks/results/decode_paths.json
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embed_throughput import CIFAR, PHOTOS, SIZES, realistic_jpegs, register_tiny  # noqa: E402

from pipeline.embed import ClipEmbedder, embed_refs  # noqa: E402
from pipeline.sources import ImageFolderSource  # noqa: E402

EPS = (0.005, 0.01, 0.02, 0.05)


def embedders(model: str) -> dict[str, ClipEmbedder]:
    torch.manual_seed(0)
    ref = ClipEmbedder(model, None, device="cpu", decode="reference")
    out = {"reference": ref}
    for name, path in (("cpu", "cpu"), ("device_code", "cpu")):
        emb = ClipEmbedder(model, None, device="cpu", decode=path)
        emb.model.load_state_dict(ref.model.state_dict())
        if name == "device_code":
            emb.decode_path = "nvjpeg"  # the device branch of embed_refs; decode_jpeg runs on this (CPU) device
        out[name] = emb
    return out


def embed_all(folder: Path, embs: dict[str, ClipEmbedder]) -> dict[str, np.ndarray]:
    source = ImageFolderSource(folder)
    refs = source.refs()
    out = {}
    for name, emb in embs.items():
        shard = embed_refs(source, refs, emb, batch_size=32, num_workers=0)
        assert shard.n_ok == len(refs), shard.status_counts()
        out[name] = shard.embeddings
    return out


def cosines(vecs: dict[str, np.ndarray]) -> dict[str, Any]:
    """min/median cosine of each path to the reference, and for scale the reference cosine between DIFFERENT images
    (each to the next one): a path change should move an embedding far less than a change of image does."""
    ref = vecs["reference"]
    between = (ref * np.roll(ref, 1, axis=0)).sum(1)
    res: dict[str, Any] = {"between_different_images": {"min": round(float(between.min()), 5),
                                                         "median": round(float(np.median(between)), 5)}}
    for name, v in vecs.items():
        if name == "reference":
            continue
        c = (v * vecs["reference"]).sum(1)
        res[name] = {"min": round(float(c.min()), 5), "median": round(float(np.median(c)), 5),
                     "mean": round(float(c.mean()), 5)}
    return res


def planted_folder(base: Path, out: Path) -> Path:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(base.iterdir()):
        data = p.read_bytes()
        (out / p.name).write_bytes(data)
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im.save(out / f"{p.stem}_q60.jpg", "JPEG", quality=60)
        im.crop((2, 2, im.width - 2, im.height - 2)).resize(im.size, Image.Resampling.BICUBIC).save(
            out / f"{p.stem}_crop.jpg", "JPEG", quality=90)
    return out


def semdedup_agreement(vecs: dict[str, np.ndarray], uids: list[str]) -> dict[str, Any]:
    from scorers.semdedup import semdedup

    n = len(uids)
    cid = np.zeros(n, dtype=np.int64)
    res: dict[str, Any] = {}
    masks = {}
    for name, v in vecs.items():
        centroid = v.mean(0, keepdims=True)
        r = semdedup(v, cid, centroid / np.linalg.norm(centroid), np.array(uids), eps=list(EPS))
        masks[name] = r
    for name in vecs:
        if name == "reference":
            continue
        res[name] = {}
        for eps in EPS:
            a = _dup_mask(masks["reference"], eps)
            b = _dup_mask(masks[name], eps)
            res[name][f"eps_{eps}"] = {"same_decision_frac": round(float((a == b).mean()), 4),
                                        "dropped_reference": int(a.sum()), "dropped_this_path": int(b.sum())}
    return res


def _dup_mask(result: Any, eps: float) -> np.ndarray:
    max_sim = np.asarray(result.max_sim, dtype=np.float64)
    return max_sim > 1 - eps


def main() -> int:
    if not PHOTOS.is_dir() or not CIFAR.is_dir():
        print("shared data not found (set WINNOW_SHARED_DATA)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="winnow-decode-paths-"))
    sets = {"photos (as shipped)": PHOTOS, **{f"photos@{w}x{h}": realistic_jpegs(tmp, (w, h)) for w, h in SIZES},
            "cifar JPEGs (32 px)": CIFAR}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"what": __doc__.split("\n\n")[0], "weights": "random init", "cosine_to_reference": {}}
    for model in ("ViT-B-32", register_tiny()):
        embs = embedders(model)
        result["cosine_to_reference"][model] = {}
        for label, folder in sets.items():
            result["cosine_to_reference"][model][label] = cosines(embed_all(folder, embs))
            print(model, label, result["cosine_to_reference"][model][label], flush=True)
        if model == "ViT-B-32":
            planted = planted_folder(sets["photos@1024x768"], tmp / "planted")
            uids = [r.uid for r in ImageFolderSource(planted).refs()]
            result["semdedup_agreement_vit_b_32"] = semdedup_agreement(embed_all(planted, embs), uids)
            print("semdedup", result["semdedup_agreement_vit_b_32"], flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = REPO / "benchmarks" / "results" / "decode_paths.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
