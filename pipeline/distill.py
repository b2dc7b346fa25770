"""Dataset distillation: synthesise a small labelled training set and evaluate it against random real subsets.

Methods (the building blocks and their papers are in scorers/distill.py):

* ``dm``  — Distribution Matching (Zhao & Bilen 2023) in pixel space: every iteration draws a freshly initialised
  ConvNet, and for every class matches the mean ``embed`` feature of a real batch and of the class's synthetic images,
  both passed through the same Siamese DSA transformation. Synthetic images start from random real images of their
  class. Reference optimiser: SGD on the images, lr 1, momentum 0.5, one step per iteration (gradients summed over classes).
* ``ncfm`` — NCFM-style characteristic-function matching (Wang et al. CVPR 2025) in pixel space: the same loop with the
  CF discrepancy (amplitude α + phase β) of L2-normalised ConvNet features at fresh Gaussian frequencies, ×``loss_scale``
  (300 in the reference), one optimiser step per class as the reference. Implemented: the CF discrepancy, frequency
  sampling, per-class matching, DSA. Not implemented: the learned frequency-sampling network (the min-max part; t is
  drawn t ~ N(0, σ²I) — the reference's own default when ``sampling_net: False``), matching on a pool of briefly
  pre-trained ConvNets instead of random ones, the calibration loss with a trained teacher, and the multi-formation
  ("factor 2") decoding of several small images per stored image.
* ``ncfm_embedding`` — CF matching directly on embeddings from an embedding store (e.g. CLIP): ``ipc`` synthetic
  unit vectors per class, initialised from real embeddings of the class, optimised with Adam on the CF discrepancy
  against random real batches of the class; written back unit-normalised as an embedding store.
* ``flip: true`` (pixel methods) — FYI (Son et al. ECCV 2024): the synthetic batch of a class is matched together
  with its horizontal mirror (``scorers.distill.flip_concat``) to break bilateral equivalence.

Outputs (``<output_root>/<name>/``), each file written to a temporary name and renamed:

    images/<class>/syn-<class>-<i>.png   pixel methods: the synthetic images (8-bit, de-normalised, clipped)
    store/                               ncfm_embedding: the synthetic embeddings as an embedding store
    manifest.parquet                     one row per synthetic sample: uid syn-<class>-<i>, keep, weight 1,
                                         cluster -1, reason "synthetic", label, location, method
    run.json                             config (with an image_folder source over images/, so pipeline.loader.
                                         ManifestDataset reads the set), method, loss curve, evaluation, timings

Evaluation ("standard protocol", DM/DSA ``evaluate_synset``): a ConvNet of the same architecture is trained from
scratch on the synthetic set (SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr ×0.1 after half the epochs, batch 256,
DSA augmentation with per-image parameters) and tested on the real test split; the same is done on random real
subsets of equal size. Accuracies over (synthetic sets × networks) give mean ± std. The published protocol trains for
1000 epochs, with 5 sets × 20 networks, after 20,000 distillation iterations; on the CPU the config shortens all of it.
What is evaluated is exactly what is written: the 8-bit quantised images.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pipeline.atomic import atomic_write_bytes
from pipeline.config import RunName, Strict, load_validated
from scorers.device import select_device
from pipeline.manifest import write_manifest
from scorers.distill import DSA_STRATEGY, cf_loss, convnet, dm_loss, dsa_augment, flip_concat, sample_frequencies

SHARED_DATA_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"
NPZ_FILES = {"fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10_jpeg_bytes.npz"}
Method = Literal["dm", "ncfm", "ncfm_embedding"]


# ====================================================================================================== config
class DataConfig(Strict):
    """Where the real data comes from.

    kind ``npz``: the shared benchmark files (``name``: fashion_mnist | cifar10; ``root``: their folder).
    kind ``image_folder``: ``root`` with ``train_split``/``test_split`` subfolders of class folders, resized to ``image_size``.
    kind ``store``: an embedding store with labels (``root``); ``test_fraction`` of each class is held out for evaluation.
    """

    kind: Literal["npz", "image_folder", "store"] = "npz"
    name: Literal["fashion_mnist", "cifar10"] | None = None
    root: Path = SHARED_DATA_DEFAULT
    train_split: str | None = "train"
    test_split: str | None = "test"
    image_size: int = Field(32, ge=8, le=256)
    grey: bool = False
    per_class: int | None = Field(None, ge=1)  # real pool per class (random, seeded); None = every training image
    test_limit: int | None = Field(None, ge=1)  # evaluate on the first test_limit test images; None = all
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind == "npz" and self.name is None:
            raise ValueError("data.kind 'npz' needs data.name: fashion_mnist or cifar10")
        return self


class NetConfig(Strict):
    width: int = Field(128, ge=1)
    depth: int = Field(3, ge=1, le=6)


class CFConfig(Strict):
    num_freqs: int = Field(4096, ge=1)
    alpha: float = Field(0.5, ge=0)  # amplitude weight
    beta: float = Field(0.5, ge=0)  # phase weight
    loss_scale: float = Field(300.0, gt=0)
    freq_scale: float = Field(1.0, gt=0)


class EvalConfig(Strict):
    enabled: bool = True
    n_nets: int = Field(2, ge=1)  # networks trained per synthetic (and per random real) set
    epochs: int = Field(300, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(256, ge=1)
    random_baseline: bool = True  # also evaluate random real subsets of the same size
    dsa: bool = True  # DSA augmentation while training the evaluation networks
    probe_steps: int = Field(300, ge=1)  # ncfm_embedding: full-batch steps of the linear probe


class DistillConfig(Strict):
    name: RunName = "distill"
    output_root: Path = Path("manifests/runs")
    data: DataConfig
    method: Method = "dm"
    flip: bool = False  # FYI
    ipc: int = Field(10, ge=1)
    iterations: int = Field(1000, ge=0)
    batch_real: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adam"] | None = None  # default: sgd for dm, adam for the CF methods
    lr_img: float | None = Field(None, gt=0)  # default: 1.0 (dm, sgd), 0.01 (ncfm, ncfm_embedding; adam)
    momentum: float = Field(0.5, ge=0, lt=1)
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    net: NetConfig = NetConfig()
    cf: CFConfig = CFConfig()
    n_sets: int = Field(1, ge=1)  # synthetic sets distilled with seeds seed, seed+1, ...; set 0 is written
    eval: EvalConfig = EvalConfig()
    device: str = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if (self.method == "ncfm_embedding") != (self.data.kind == "store"):
            raise ValueError("method 'ncfm_embedding' works on data.kind 'store' and only pixel methods work on images")
        if self.flip and self.method == "ncfm_embedding":
            raise ValueError("flip (FYI) is a pixel-space option; it has no meaning for embeddings")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.name

    @property
    def resolved_optimizer(self) -> str:
        return self.optimizer or ("sgd" if self.method == "dm" else "adam")

    @property
    def resolved_lr(self) -> float:
        if self.lr_img is not None:
            return self.lr_img
        return 1.0 if self.resolved_optimizer == "sgd" else 0.01

    @property
    def method_label(self) -> str:
        return self.method + ("+flip" if self.flip else "")


def load_distill_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """The distill config; relative paths in the file resolve against its folder; errors are one line."""
    return load_validated(DistillConfig, path, overrides)


# ======================================================================================================== data
@dataclass
class ImageData:
    """Real images as uint8 (N, H, W, C) with int64 labels; ``classes[i]`` names label i."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the training pool in [0, 1] (the normalisation every network sees)."""
        x = self.x_train.reshape(-1, self.channels).astype(np.float64) / 255.0
        return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


@dataclass
class EmbeddingData:
    emb_train: np.ndarray  # float32 (N, D)
    y_train: np.ndarray
    emb_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _pool_indices(y: np.ndarray, n_classes: int, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    if per_class is None:
        return np.arange(len(y))
    parts = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        parts.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return np.concatenate(parts)


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    from PIL import Image

    raw = memoryview(np.ascontiguousarray(blob))
    out = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
    for k, i in enumerate(idx):
        with Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])) as im:
            out[k] = np.asarray(im.convert("RGB"))
    return out


def load_npz(name: str, root: str | Path = SHARED_DATA_DEFAULT, *, per_class: int | None = None,
             test_limit: int | None = None, seed: int = 0) -> ImageData:
    """Fashion-MNIST or CIFAR-10 (JPEG bytes) from the shared npz files; only the chosen pool is decoded."""
    if name not in NPZ_FILES:
        raise ValueError(f"unknown npz dataset {name!r}; expected one of {sorted(NPZ_FILES)}")
    path = Path(root) / NPZ_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (data.root must be the shared data folder)")
    rng = np.random.default_rng(seed)
    with np.load(path) as z:
        classes = [str(c) for c in z["classes"]]
        y_train = np.asarray(z["y_train"], dtype=np.int64)
        y_test = np.asarray(z["y_test"], dtype=np.int64)
        pool = _pool_indices(y_train, len(classes), per_class, rng)
        test = np.arange(len(y_test) if test_limit is None else min(test_limit, len(y_test)))
        if name == "fashion_mnist":
            x_train = np.asarray(z["x_train"])[pool][..., None]
            x_test = np.asarray(z["x_test"])[test][..., None]
        else:
            x_train = _decode_jpegs(z["jpeg_train"], z["offsets_train"], pool)
            x_test = _decode_jpegs(z["jpeg_test"], z["offsets_test"], test)
    desc = {"kind": "npz", "name": name, "path": str(path), "pool": int(len(pool)), "test": int(len(test)),
            "per_class": per_class, "test_limit": test_limit}
    return ImageData(x_train, y_train[pool], x_test, y_test[test], classes, desc)


def load_image_folder(root: str | Path, *, train_split: str | None, test_split: str | None, image_size: int,
                      grey: bool, per_class: int | None = None, test_limit: int | None = None, seed: int = 0) -> ImageData:
    """An image folder with class subfolders (``train_split``/``test_split`` below ``root``), resized to a square."""
    from PIL import Image

    from pipeline.decode import decode_image
    from pipeline.sources import ImageFolderSource

    def read(split: str | None) -> tuple[list[Any], list[str]]:
        src = ImageFolderSource(root, split=split, labels_from_subfolders=True)
        refs = src.refs()
        return refs, [r.label for r in refs]

    train_refs, train_labels = read(train_split)
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError(f"{root}: distillation needs at least two classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    y_all = np.array([index[lab] for lab in train_labels], dtype=np.int64)
    pool = _pool_indices(y_all, len(classes), per_class, rng)

    def load(src_refs: list[Any], idx: np.ndarray, split: str | None) -> np.ndarray:
        src = ImageFolderSource(root, split=split, labels_from_subfolders=True)
        out = np.empty((len(idx), image_size, image_size, 1 if grey else 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            res = decode_image(src.read_bytes(src_refs[i]))
            if res.image is None:
                raise ValueError(f"{src_refs[i].uid} does not decode: {res.status}")
            im = res.image.convert("L" if grey else "RGB").resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im)
            out[k] = arr[..., None] if grey else arr
        return out

    x_train = load(train_refs, pool, train_split)
    if test_split is None:
        raise ValueError("data.test_split is required for image folders (the evaluation needs a real test split)")
    test_refs, test_labels = read(test_split)
    keep = [i for i, lab in enumerate(test_labels) if lab in index]
    if test_limit is not None:
        keep = keep[:test_limit]
    x_test = load(test_refs, np.array(keep, dtype=np.int64), test_split)
    y_test = np.array([index[test_labels[i]] for i in keep], dtype=np.int64)
    desc = {"kind": "image_folder", "root": str(Path(root).resolve()), "train_split": train_split,
            "test_split": test_split, "image_size": image_size, "grey": grey, "pool": int(len(pool)), "test": len(keep)}
    return ImageData(x_train, y_all[pool], x_test, y_test, classes, desc)


def load_store_embeddings(root: str | Path, *, test_fraction: float = 0.2, per_class: int | None = None,
                          seed: int = 0) -> EmbeddingData:
    """Labelled embeddings of a store, split per class into a distillation pool and a held-out test part."""
    from pipeline.store import EmbeddingStore

    store = EmbeddingStore(root)
    emb, meta = store.load(dtype="float32")
    labels = meta["label"].to_list()
    if any(lab is None for lab in labels):
        raise ValueError(f"store {root} has rows without a label; distillation needs labels")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[lab] for lab in labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = max(1, int(round(test_fraction * len(idx))))
        if len(idx) - n_test < 1:
            raise ValueError(f"class {classes[c]!r} has {len(idx)} rows: too few to hold out a test part")
        test_parts.append(idx[:n_test])
        tr = idx[n_test:]
        train_parts.append(tr if per_class is None else tr[:per_class])
    tr, te = np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))
    desc = {"kind": "store", "root": str(Path(root).resolve()), "fingerprint": store.fingerprint(),
            "pool": int(len(tr)), "test": int(len(te)), "test_fraction": test_fraction}
    return EmbeddingData(emb[tr], y[tr], emb[te], y[te], classes, desc)


def load_data(cfg: DistillConfig) -> ImageData | EmbeddingData:
    d = cfg.data
    if d.kind == "npz":
        return load_npz(d.name, d.root, per_class=d.per_class, test_limit=d.test_limit, seed=cfg.seed)
    if d.kind == "image_folder":
        return load_image_folder(d.root, train_split=d.train_split, test_split=d.test_split, image_size=d.image_size,
                                 grey=d.grey, per_class=d.per_class, test_limit=d.test_limit, seed=cfg.seed)
    return load_store_embeddings(d.root, test_fraction=d.test_fraction, per_class=d.per_class, seed=cfg.seed)


def to_tensor(x_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.from_numpy(mean).view(1, -1, 1, 1)) / torch.from_numpy(std).view(1, -1, 1, 1)


def to_uint8(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised (N, C, H, W) -> uint8 (N, H, W, C): de-normalise, clip to [0, 1], round."""
    x = x.detach().cpu().float() * torch.from_numpy(std).view(1, -1, 1, 1) + torch.from_numpy(mean).view(1, -1, 1, 1)
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# ================================================================================================ distillation
@dataclass
class SynSet:
    """One distilled set: ``x`` uint8 images (N, H, W, C) or float32 embeddings (N, D), labels in class-major order."""

    x: np.ndarray
    y: np.ndarray
    losses: list[float]
    init_indices: np.ndarray  # pool rows the synthetic samples were initialised from
    seconds: float
    seed: int


def _optimizer(params: list[torch.Tensor], name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def _init_indices(y: np.ndarray, n_classes: int, ipc: int, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) == 0:
            raise ValueError(f"class {c} has no real samples in the pool")
        parts.append(rng.choice(idx, size=ipc, replace=len(idx) < ipc))
    return np.concatenate(parts)


def distill_pixels(data: ImageData, *, method: Literal["dm", "ncfm"] = "dm", ipc: int = 10, iterations: int = 1000,
                   batch_real: int = 256, flip: bool = False, dsa: bool = True, dsa_strategy: str = DSA_STRATEGY,
                   optimizer: str = "sgd", lr_img: float = 1.0, momentum: float = 0.5, width: int = 128,
                   depth: int = 3, num_freqs: int = 4096, alpha: float = 0.5, beta: float = 0.5,
                   loss_scale: float = 300.0, freq_scale: float = 1.0, seed: int = 0,
                   device: torch.device | str = "cpu",
                   progress: Callable[[int, float], None] | None = None) -> SynSet:
    """Distils ``ipc`` images per class with DM or NCFM-style CF matching (module docstring); deterministic in ``seed``.

    Every iteration: a new randomly initialised ConvNet (frozen); per class, a random real batch of ``batch_real`` and
    the class's synthetic images (plus their mirrors when ``flip``) go through the same Siamese DSA draw; their
    ``embed`` features are matched. ``progress(iteration, mean loss per class)`` is called after every iteration.
    """
    if method not in ("dm", "ncfm"):
        raise ValueError(f"pixel methods are 'dm' and 'ncfm', got {method!r}")
    device = torch.device(device)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    freq_gen = torch.Generator().manual_seed(seed + 7919)
    mean, std = data.mean_std()
    x_pool = to_tensor(data.x_train, mean, std).to(device)
    y_pool = data.y_train
    n_classes = data.n_classes
    class_idx = [np.flatnonzero(y_pool == c) for c in range(n_classes)]
    init = _init_indices(y_pool, n_classes, ipc, rng)
    syn = x_pool[torch.from_numpy(init).to(device)].clone().requires_grad_(True)
    opt = _optimizer([syn], optimizer, lr_img, momentum)
    losses: list[float] = []
    for it in range(iterations):
        net = convnet(data.channels, n_classes, width=width, depth=depth, image_size=data.image_size,
                      seed=int(rng.integers(2**31))).to(device)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for c in range(n_classes):
            pick = rng.choice(class_idx[c], size=min(batch_real, len(class_idx[c])), replace=False)
            img_real = x_pool[torch.from_numpy(pick).to(device)]
            img_syn = syn[c * ipc:(c + 1) * ipc]
            if flip:
                img_syn = flip_concat(img_syn)
            if dsa:
                s = int(rng.integers(2**31))
                img_real = dsa_augment(img_real, seed=s, strategy=dsa_strategy)
                img_syn = dsa_augment(img_syn, seed=s, strategy=dsa_strategy)
            with torch.no_grad():
                feat_real = net.embed(img_real)
            feat_syn = net.embed(img_syn)
            if method == "dm":
                loss = dm_loss(feat_real, feat_syn)
            else:
                t = sample_frequencies(num_freqs, feat_syn.shape[1], generator=freq_gen, scale=freq_scale, device=device)
                loss = loss_scale * cf_loss(feat_real, feat_syn, t=t, alpha=alpha, beta=beta)
            loss.backward()
            total += float(loss.detach())
            if method == "ncfm":  # the reference steps once per class
                opt.step()
                opt.zero_grad(set_to_none=True)
        if method == "dm":  # the reference sums the class gradients and steps once per iteration
            opt.step()
        losses.append(total / n_classes)
        if progress is not None:
            progress(it, losses[-1])
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), ipc)
    return SynSet(to_uint8(syn, mean, std), labels, losses, init, time.perf_counter() - start, seed)


def distill_embeddings(data: EmbeddingData, *, ipc: int = 10, iterations: int = 1000, batch_real: int = 256,
                       lr: float = 0.01, num_freqs: int = 4096, alpha: float = 0.5, beta: float = 0.5,
                       loss_scale: float = 300.0, freq_scale: float = 1.0, seed: int = 0,
                       device: torch.device | str = "cpu",
                       progress: Callable[[int, float], None] | None = None) -> SynSet:
    """CF matching on embeddings: ``ipc`` unit vectors per class, initialised from real ones, Adam on the CF loss."""
    device = torch.device(device)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    freq_gen = torch.Generator().manual_seed(seed + 7919)
    pool = torch.from_numpy(np.ascontiguousarray(data.emb_train, dtype=np.float32)).to(device)
    pool = F.normalize(pool, dim=1)
    n_classes = data.n_classes
    class_idx = [np.flatnonzero(data.y_train == c) for c in range(n_classes)]
    init = _init_indices(data.y_train, n_classes, ipc, rng)
    syn = pool[torch.from_numpy(init).to(device)].clone().requires_grad_(True)
    opt = torch.optim.Adam([syn], lr=lr)
    losses: list[float] = []
    for it in range(iterations):
        total = 0.0
        for c in range(n_classes):
            pick = rng.choice(class_idx[c], size=min(batch_real, len(class_idx[c])), replace=False)
            t = sample_frequencies(num_freqs, pool.shape[1], generator=freq_gen, scale=freq_scale, device=device)
            loss = loss_scale * cf_loss(pool[torch.from_numpy(pick).to(device)], syn[c * ipc:(c + 1) * ipc],
                                        t=t, alpha=alpha, beta=beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total / n_classes)
        if progress is not None:
            progress(it, losses[-1])
    out = F.normalize(syn.detach(), dim=1).cpu().numpy().astype(np.float32)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), ipc)
    return SynSet(out, labels, losses, init, time.perf_counter() - start, seed)


def random_real_subset(data: ImageData | EmbeddingData, *, ipc: int, seed: int) -> SynSet:
    """The baseline: ``ipc`` random real samples per class from the same pool (class-major order)."""
    rng = np.random.default_rng(seed)
    y = data.y_train
    parts = [rng.choice(np.flatnonzero(y == c), size=ipc, replace=int((y == c).sum()) < ipc) for c in range(data.n_classes)]
    idx = np.concatenate(parts)
    x = data.x_train[idx] if isinstance(data, ImageData) else data.emb_train[idx]
    return SynSet(np.ascontiguousarray(x), y[idx], [], idx, 0.0, seed)


def synthesise(cfg: DistillConfig, data: ImageData | EmbeddingData, set_index: int, *,
               device: torch.device | None = None, progress: Callable[[int, float], None] | None = None) -> SynSet:
    """Distils synthetic set number ``set_index`` (seed = cfg.seed + set_index) with the config's method."""
    device = device if device is not None else select_device(cfg.device)
    seed = cfg.seed + set_index
    if cfg.method == "ncfm_embedding":
        assert isinstance(data, EmbeddingData)
        return distill_embeddings(data, ipc=cfg.ipc, iterations=cfg.iterations, batch_real=cfg.batch_real,
                                  lr=cfg.resolved_lr, num_freqs=cfg.cf.num_freqs, alpha=cfg.cf.alpha,
                                  beta=cfg.cf.beta, loss_scale=cfg.cf.loss_scale, freq_scale=cfg.cf.freq_scale,
                                  seed=seed, device=device, progress=progress)
    assert isinstance(data, ImageData)
    return distill_pixels(data, method=cfg.method, ipc=cfg.ipc, iterations=cfg.iterations, batch_real=cfg.batch_real,
                          flip=cfg.flip, dsa=cfg.dsa, dsa_strategy=cfg.dsa_strategy, optimizer=cfg.resolved_optimizer,
                          lr_img=cfg.resolved_lr, momentum=cfg.momentum, width=cfg.net.width, depth=cfg.net.depth,
                          num_freqs=cfg.cf.num_freqs, alpha=cfg.cf.alpha, beta=cfg.cf.beta,
                          loss_scale=cfg.cf.loss_scale, freq_scale=cfg.cf.freq_scale, seed=seed, device=device,
                          progress=progress)


# ================================================================================================== evaluation
def train_and_test(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                   n_classes: int, mean: np.ndarray, std: np.ndarray, width: int = 128, depth: int = 3,
                   epochs: int = 300, lr: float = 0.01, batch_size: int = 256, dsa: bool = True,
                   dsa_strategy: str = DSA_STRATEGY, seed: int = 0, device: torch.device | str = "cpu") -> float:
    """The DM/DSA evaluation: a fresh ConvNet trained from scratch on uint8 images ``x_train``; test accuracy in [0, 1].

    SGD (momentum 0.9, weight decay 5e-4), lr ×0.1 after epochs // 2 + 1 epochs, shuffled batches, DSA per image.
    """
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    xt = to_tensor(x_train, mean, std).to(device)
    yt = torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(device)
    net = convnet(xt.shape[1], n_classes, width=width, depth=depth, image_size=xt.shape[2], seed=seed).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_at = epochs // 2 + 1
    net.train()
    for ep in range(epochs):
        if ep == decay_at:
            for g in opt.param_groups:
                g["lr"] = lr * 0.1
        order = torch.from_numpy(rng.permutation(len(yt))).to(device)
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            img = xt[b]
            if dsa:
                img = dsa_augment(img, seed=int(rng.integers(2**31)), siamese=False, strategy=dsa_strategy)
            loss = F.cross_entropy(net(img), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return _accuracy(net, to_tensor(x_test, mean, std), y_test, device)


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: np.ndarray, device: torch.device, batch: int = 1000) -> float:
    net.eval()
    correct = 0
    for s in range(0, len(x), batch):
        pred = net(x[s:s + batch].to(device)).argmax(1).cpu().numpy()
        correct += int((pred == y[s:s + batch]).sum())
    return correct / max(len(x), 1)


def probe_and_test(emb_train: np.ndarray, y_train: np.ndarray, emb_test: np.ndarray, y_test: np.ndarray, *,
                   n_classes: int, steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Embedding-space evaluation: a linear probe (softmax regression, full-batch Adam) trained from scratch on the set."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.from_numpy(np.ascontiguousarray(emb_train, dtype=np.float32)), dim=1)
    y = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    w = (torch.randn(x.shape[1], n_classes, generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = F.normalize(torch.from_numpy(np.ascontiguousarray(emb_test, dtype=np.float32)), dim=1)
        pred = (xt @ w + b).argmax(1).numpy()
    return float((pred == y_test).mean())


def evaluate_sets(cfg: DistillConfig, data: ImageData | EmbeddingData, sets: list[SynSet], *,
                  device: torch.device | None = None) -> list[float]:
    """Test accuracy of ``cfg.eval.n_nets`` networks trained from scratch on each set (set-major order)."""
    device = device if device is not None else select_device(cfg.device)
    accs: list[float] = []
    mean, std = data.mean_std() if isinstance(data, ImageData) else (None, None)
    for k, s in enumerate(sets):
        for j in range(cfg.eval.n_nets):
            seed = 100_003 * (s.seed + 1) + 1_009 * k + j
            if isinstance(data, EmbeddingData):
                accs.append(probe_and_test(s.x, s.y, data.emb_test, data.y_test, n_classes=data.n_classes,
                                           steps=cfg.eval.probe_steps, seed=seed))
            else:
                accs.append(train_and_test(s.x, s.y, data.x_test, data.y_test, n_classes=data.n_classes, mean=mean,
                                           std=std, width=cfg.net.width, depth=cfg.net.depth, epochs=cfg.eval.epochs,
                                           lr=cfg.eval.lr, batch_size=cfg.eval.batch_size, dsa=cfg.eval.dsa,
                                           dsa_strategy=cfg.dsa_strategy, seed=seed, device=device))
    return accs


def summarise(accs: list[float]) -> dict[str, Any]:
    a = np.asarray(accs, dtype=np.float64)
    return {"mean": float(a.mean()) if len(a) else math.nan, "std": float(a.std()) if len(a) else math.nan,
            "n": int(len(a)), "accuracies": [float(v) for v in a]}


# ===================================================================================================== outputs
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")


def class_slugs(classes: list[str]) -> list[str]:
    """File- and uid-safe class names (runs of other characters become '_'); an error if two collide."""
    slugs = [_UNSAFE.sub("_", c).strip("_") or f"class{i}" for i, c in enumerate(classes)]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"class names {classes} do not map to distinct uid-safe names {slugs}")
    return slugs


def synthetic_uids(classes: list[str], labels: np.ndarray) -> list[str]:
    """``syn-<class>-<i>``: i counts the samples of each class from 0."""
    slugs = class_slugs(classes)
    seen = [0] * len(classes)
    uids = []
    for lab in labels:
        uids.append(f"syn-{slugs[lab]}-{seen[lab]}")
        seen[lab] += 1
    return uids


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., 0] if img.shape[2] == 1 else img)).save(buf, format="PNG")  # L or RGB
    return buf.getvalue()


def _manifest_frame(uids: list[str], labels: list[str], locations: list[str | None], method: str) -> pl.DataFrame:
    n = len(uids)
    return pl.DataFrame({
        "uid": uids,
        "keep": [True] * n,
        "weight": np.ones(n, dtype=np.float32),
        "cluster": np.full(n, -1, dtype=np.int32),
        "reason": ["synthetic"] * n,
        "label": labels,
        "location": locations,
        "method": [method] * n,  # a query on the manifest alone can tell how each row was made
        "status": ["ok"] * n,
    })


def write_pixel_set(run_dir: str | Path, syn: SynSet, classes: list[str], *, method: str,
                    run_info: dict[str, Any]) -> Path:
    """PNG files under ``run_dir/images/<class>/``, then manifest.parquet and run.json (each atomically).

    run.json's ``config.source`` is an image_folder source over ``images/``, so ``ManifestDataset(run_dir)`` works.
    """
    run_dir = Path(run_dir)
    images = run_dir / "images"
    slugs = class_slugs(classes)
    uids = synthetic_uids(classes, syn.y)
    locations = []
    for uid, img, lab in zip(uids, syn.x, syn.y):
        path = images / slugs[lab] / f"{uid}.png"
        atomic_write_bytes(path, _png_bytes(img))
        locations.append(str(path.resolve()))
    frame = _manifest_frame(uids, [classes[i] for i in syn.y], locations, method)
    info = dict(run_info)
    info["config"] = {**info.get("config", {}),
                      "source": {"kind": "image_folder", "root": str(images.resolve()), "split": None,
                                 "labels_from_subfolders": True, "extensions": [".png"]}}
    return write_manifest(frame, run_dir, info)


def write_embedding_set(run_dir: str | Path, syn: SynSet, classes: list[str], *, method: str,
                        run_info: dict[str, Any], source_desc: dict[str, Any]) -> Path:
    """The synthetic embeddings as a one-shard embedding store under ``run_dir/store``, then the manifest."""
    from pipeline.store import EmbeddingStore, StoreInfo

    run_dir = Path(run_dir)
    uids = synthetic_uids(classes, syn.y)
    store = EmbeddingStore(run_dir / "store")
    for sub in ("emb", "meta", "_done"):  # a rerun replaces the set: stale shards must not survive
        for p in (store.root / sub).glob("*") if (store.root / sub).is_dir() else []:
            p.unlink()
    store.info_path.unlink(missing_ok=True)
    store.init(StoreInfo(dim=int(syn.x.shape[1]), dtype="float32",
                         embedder={"kind": "distilled", "method": method, "from": source_desc},
                         source={"kind": "distilled", "method": method}, shard_size=max(len(uids), 1), n_shards=1))
    meta = [{"uid": u, "location": None, "label": classes[lab], "caption": method,
             "sha1": hashlib.sha1(row.tobytes()).hexdigest(), "width": None, "height": None, "status": "ok"}
            for u, row, lab in zip(uids, syn.x, syn.y)]
    store.write_shard(0, syn.x.astype(np.float32), meta)
    frame = _manifest_frame(uids, [classes[i] for i in syn.y], [None] * len(uids), method)
    info = dict(run_info)
    info["store"] = str(store.root.resolve())
    return write_manifest(frame, run_dir, info)


def write_outputs(cfg: DistillConfig, data: ImageData | EmbeddingData, syn: SynSet, *, evaluation: dict[str, Any],
                  timings: dict[str, float], device: str) -> Path:
    info = build_run_info(cfg, data, syn, evaluation=evaluation, timings=timings, device=device)
    if isinstance(data, EmbeddingData):
        return write_embedding_set(cfg.run_dir, syn, data.classes, method=cfg.method_label, run_info=info,
                                   source_desc=data.description)
    return write_pixel_set(cfg.run_dir, syn, data.classes, method=cfg.method_label, run_info=info)


def build_run_info(cfg: DistillConfig, data: ImageData | EmbeddingData, syn: SynSet, *, evaluation: dict[str, Any],
                   timings: dict[str, float], device: str) -> dict[str, Any]:
    import platform

    return {
        "kind": "distill",
        "config": {"distill": cfg.model_dump(mode="json")},
        "method": cfg.method_label,
        "data": data.description,
        "classes": data.classes,
        "counts": {"synthetic": int(len(syn.y)), "ipc": cfg.ipc, "classes": data.n_classes},
        "loss": {"first": syn.losses[0] if syn.losses else None, "last": syn.losses[-1] if syn.losses else None,
                 "curve": syn.losses},
        "init_pool_rows": syn.init_indices,
        "evaluation": evaluation,
        "timings_s": timings,
        "device": device,
        "orientation": "losses are discrepancies (lower = synthetic closer to real); accuracies higher = better",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def run_distill(cfg: DistillConfig, *, progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Plain-Python driver (the Prefect flow calls the same pieces): load, distil n_sets, evaluate, write set 0."""
    device = select_device(cfg.device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_data(cfg)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sets = [synthesise(cfg, data, k, device=device, progress=progress) for k in range(cfg.n_sets)]
    timings["distill"] = time.perf_counter() - t0
    evaluation = evaluate(cfg, data, sets, device=device)
    timings["evaluate"] = evaluation.pop("seconds", 0.0)
    write_outputs(cfg, data, sets[0], evaluation=evaluation, timings=timings, device=str(device))
    from pipeline.manifest import read_run_info

    return read_run_info(cfg.run_dir)


def evaluate(cfg: DistillConfig, data: ImageData | EmbeddingData, sets: list[SynSet], *,
             device: torch.device | None = None) -> dict[str, Any]:
    """Synthetic sets and (optionally) as many random real subsets of the same size, each with cfg.eval.n_nets nets."""
    if not cfg.eval.enabled:
        return {"enabled": False}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"enabled": True, "n_sets": len(sets), "n_nets": cfg.eval.n_nets, "epochs": cfg.eval.epochs,
                           "synthetic": summarise(evaluate_sets(cfg, data, sets, device=device))}
    if cfg.eval.random_baseline:
        real = [random_real_subset(data, ipc=cfg.ipc, seed=10_000 + s.seed) for s in sets]
        out["random_real"] = summarise(evaluate_sets(cfg, data, real, device=device))
    out["seconds"] = time.perf_counter() - t0
    return out
