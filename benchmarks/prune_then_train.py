"""Prune, then train: does winnow's data pruning beat a random subset of the same size? (issue 3)

Real data: CIFAR-10 (the shared JPEG re-encoding, decoded once with Pillow) and Fashion-MNIST.

Protocol (fixed; every number in benchmarks/results/prune_then_train.md comes from it)
-------------------------------------------------------------------------------------
The machine this runs on has 2 CPU cores shared with other work; a small CNN (conv 32-64-128 + BN + max-pool) trains
there at ~200-550 images/s. The benchmark needs 3 seeds x (8 methods x 4 kept fractions + full data) = 99 trainings per
dataset (sum of kept fractions x methods x seeds = 41 full-pool trainings), which for a CNN trained from pixels on a
40k pool would take about a day. So the per-configuration learner is trained on frozen image features, the way winnow
itself is meant to be used (curate in embedding space, train downstream):

1. **Split** the training set, class-balanced with a fixed seed, into a *reference* split (10k images) and the *pool*
   (CIFAR-10: the other 40k; Fashion-MNIST: a class-balanced 40k of the other 50k). Only the pool is pruned; accuracy
   is measured on the full official test set (10k).
2. **Features**: a small CNN (conv3x3 32-64-128, each + BatchNorm + ReLU + 2x2 max-pool, global average pool, linear)
   trained from scratch on the *reference split only* (SGD nesterov 0.9, one-cycle max lr 0.1, wd 5e-4, batch 128,
   8 epochs CIFAR-10 with random horizontal flips / 5 epochs Fashion-MNIST). Its 128-d penultimate activations (eval
   mode) are the features of every pool and test image. The feature CNN never sees a pool label, so pruning decisions
   cannot leak into it. Cached under benchmarks/.cache.
3. **Learner** (what is trained on each kept subset): an MLP 128 -> 256 (ReLU) -> 10 on the pool-standardised
   features, SGD nesterov 0.9, one-cycle lr (max 0.05, linear warm-up over 25 % of the steps, cosine to 0), wd 5e-4,
   batch 128. Two training budgets: **equal SGD steps** (the headline: every subset trains for the steps the full pool
   gets in 15 epochs, as data_diet's code trains every subset for 78,000 steps and the CCS code for ``--iterations``) and
   **equal epochs** (15 epochs over the subset, so a 10 % subset gets 10 % of the steps; the second table). Seeds 0, 1, 2 set the learner's init and batch order, and the randomness of random / CCS selection. All
   models of one kept fraction train together as one batched model (independent weights, independent batches), which
   is what makes the trainings cheap; identical (subset, seed) pairs train once.
4. **Scores** (computed once per dataset, seed 0, on the pool):
   - EL2N and GraNd, *model mode* (``scorers.el2n.el2n_model_scores``): the learner itself (the MLP above), 2 seeds x
     1 epoch at a constant lr 0.05 (7 % of the 15-epoch run; the paper's "early in training" is epoch 20 of 200 = 10 %;
     after 2 epochs the MLP already fitted ~99 % of the easy sets and most EL2N values were ~0; the results record each
     score's quantiles and how many of CCS's 50 bins are empty),
     eval mode; GraNd = per-example gradient norm over all MLP parameters (torch.func). AUM recorded in the same runs.
   - EL2N, *embedding mode* (``scorers.el2n.el2n_embedding_scores``) on the L2-normalised CNN features: linear proxy
     heads, 5 seeds x 5-fold cross-fitting (out-of-fold), scored after epoch 2 of Adam.
   - Prototypes (``scorers.prototypes``, Sorscher et al. 2022): faiss spherical k-means (k = 100) on the L2-normalised
     features, score = distance to the nearest centroid, keep hard.
5. **Selection** (``scorers.select.select``, class-balanced, exact budget): random; el2n_model / grand_model /
   el2n_emb / prototypes with the keep-hardest rule (the papers' rule); ccs_aum (CCS binning -AUM) and ccs_el2n (CCS
   binning EL2N), both cutting the hardest beta·N by -AUM as Zheng et al. do, beta = select's default for the fraction
   (0.3 at 10 % kept, 0.1 at 30 %, 0 from 50 %); moderate (Moderate-DS: middle band of the distance to the class median
   of the L2-normalised features); heuristic_el2n (model-mode EL2N with the fixed ``rule="heuristic"``: hard at ≥ 70 %
   kept, CCS below); **auto_el2n, the row chosen in advance** (model-mode EL2N with winnow's default ``rule: auto``: the
   rule picked per fraction by ``pipeline.evaluate.choose_rule``: hard / easy / ccs / moderate / random on a random 80 %
   of the pool, linear probes on the L2-normalised features tested on the other 20 %).
6. **Label-noise check**: flip 10 % of the pool labels (seeded, each to a uniformly drawn other class), rescore EL2N
   (both modes, same settings; no GraNd, whose per-sample gradients dominate the scoring time) and AUM, and report the
   share of the flipped samples that land in the top 10 % of EL2N (the bottom 10 % of AUM). Chance 10 %, perfect 100 %.

Reported: test accuracy (%) mean +- sample std (ddof = 1) over the seeds; a method "beats random" at a fraction when its
mean exceeds random's by more than 2 x the larger of the two stds; beside it, method − random with a paired bootstrap
95 % CI over the test rows and the seeds (``pipeline.evaluate.paired_bootstrap``), because the seed std alone ignores the
test set's sampling error.

``--learner cnn`` swaps step 3 for the small CNN trained from pixels on each kept subset (model-mode scores then come
from that CNN too). It is the protocol to run where there is time or a GPU; the reported numbers use ``mlp``.

Usage: ``python benchmarks/prune_then_train.py --dataset both`` (measured: 40 min on 2 shared cores with the feature
CNNs cached, plus ~19 min to train them once); ``--quick`` is a smoke configuration (~50 s) that writes under
benchmarks/.cache/quick_results; ``--report-only`` rewrites the markdown and plot from the JSON results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common_data import CACHE_DIR, load_dataset  # noqa: E402
from pipeline.index import KMeansParams, spherical_kmeans  # noqa: E402
from scorers.select import select  # noqa: E402
from scorers.el2n import el2n_embedding_scores, el2n_model_scores  # noqa: E402
from scorers.prototypes import prototype_scores  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
DATASETS = ("cifar10", "fmnist")
N_CLASSES = 10

# method -> (score name, selection rule, knobs naming other scores). Scores are oriented higher = harder (select's
# convention); CCS cuts its beta·N hardest by -AUM as Zheng et al. do (``cut_scores``).
METHODS: dict[str, tuple[str, str, dict[str, str]]] = {
    "random": ("none", "random", {}),
    "el2n_model": ("el2n_model", "hard", {}),
    "grand_model": ("grand_model", "hard", {}),
    "el2n_emb": ("el2n_emb", "hard", {}),
    "ccs_aum": ("neg_aum_model", "ccs", {}),
    "ccs_el2n": ("el2n_model", "ccs", {"cut_scores": "neg_aum_model"}),
    "moderate": ("none", "moderate", {"embeddings": "features"}),
    "prototypes": ("prototype", "hard", {}),
    "heuristic_el2n": ("el2n_model", "heuristic", {"cut_scores": "neg_aum_model"}),
    "auto_el2n": ("el2n_model", "auto", {"cut_scores": "neg_aum_model"}),
}
PRECHOSEN = "auto_el2n"  # the row chosen in advance: winnow's default, rule: auto by evidence


@dataclass(frozen=True)
class Protocol:
    """Every knob of one dataset's run (written into the results JSON)."""

    ref_size: int  # reference split that trains the feature CNN
    pool_size: int | None  # pool = the rest of train (None) or a class-balanced subset of it
    test_size: int | None  # None = the full official test set
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    feat_epochs: int = 8
    feat_lr: float = 0.1
    feat_flip: bool = True
    learner: str = "mlp"
    hidden: int = 256
    epochs: int = 15
    lr: float = 0.05
    cnn_lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    score_seeds: int = 2
    score_epochs: int = 1
    score_lr: float = 0.05
    emb_seeds: int = 5
    emb_folds: int = 5
    kmeans_k: int = 100
    noise_rate: float = 0.1
    split_seed: int = 0


FULL = {
    "cifar10": Protocol(ref_size=10_000, pool_size=None, test_size=None, feat_epochs=8, feat_flip=True),
    "fmnist": Protocol(ref_size=10_000, pool_size=40_000, test_size=None, feat_epochs=5, feat_flip=False),
}
QUICK = {
    name: replace(p, ref_size=500, pool_size=1000, test_size=500, feat_epochs=1, epochs=3, score_seeds=2,
                  score_epochs=1, emb_seeds=2, emb_folds=3, kmeans_k=10)
    for name, p in FULL.items()
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def balanced_split(y: np.ndarray, first: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced random split: ``first`` indices (equal per class, sorted) and the rest (sorted)."""
    classes = np.unique(y)
    if first % len(classes):
        raise ValueError(f"split size {first} is not a multiple of the {len(classes)} classes")
    per = first // len(classes)
    take = []
    for c in classes:
        members = np.flatnonzero(y == c)
        if per > members.size:
            raise ValueError(f"class {c} has {members.size} samples, fewer than the {per} requested")
        take.append(rng.choice(members, size=per, replace=False))
    a = np.sort(np.concatenate(take))
    rest = np.setdiff1d(np.arange(y.size), a)
    return a, rest


def to_float(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NHWC / NHW images -> normalised float32 NCHW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    t = t.float().div_(255.0)
    return (t - torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)) / torch.as_tensor(
        std, dtype=torch.float32).view(1, -1, 1, 1)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = (x.reshape(-1, 1) if x.ndim == 3 else x.reshape(-1, x.shape[-1])).astype(np.float64) / 255.0
    return flat.mean(0), flat.std(0)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv3x3 -> BN -> ReLU -> 2x2 max-pool per width, global average pool, linear."""

    def __init__(self, in_ch: int, widths: tuple[int, ...] = (32, 64, 128), n_classes: int = N_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(dim: int, hidden: int, n_classes: int = N_CLASSES) -> nn.Module:
    """The learner as a plain module (model-mode scoring trains this exact architecture)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


class BatchedMLP(nn.Module):
    """``M`` independent MLPs (dim -> hidden -> classes) as stacked weights, run with bmm on ``[M, B, dim]``.

    Each model is initialised like ``nn.Linear`` (U(+-1/sqrt(fan_in))) from its own seed.
    """

    def __init__(self, seeds: list[int], dim: int, hidden: int, n_classes: int = N_CLASSES) -> None:
        super().__init__()

        def init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
            return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)

        parts: dict[str, list[torch.Tensor]] = {"w1": [], "b1": [], "w2": [], "b2": []}
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            parts["w1"].append(init((dim, hidden), dim, g))
            parts["b1"].append(init((1, hidden), dim, g))
            parts["w2"].append(init((hidden, n_classes), hidden, g))
            parts["b2"].append(init((1, n_classes), hidden, g))
        for k, v in parts.items():
            setattr(self, k, nn.Parameter(torch.stack(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.b2, h, self.w2)


def sgd_onecycle(params: Any, lr: float, wd: float, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (nesterov 0.9) with a one-cycle schedule: linear warm-up from lr/25 over the first 25 % of the steps,
    then cosine decay to 0. Written as a LambdaLR because torch's OneCycleLR fails on runs of < 4 steps."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        t = min(step / total, 1.0)
        if t < 0.25:
            return 0.04 + 0.96 * t / 0.25
        return 0.5 * (1.0 + math.cos(math.pi * (t - 0.25) / 0.75))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_cnn(x: torch.Tensor, y: torch.Tensor, *, in_ch: int, widths: tuple[int, ...], epochs: int, lr: float,
              wd: float, batch_size: int, seed: int, flip: bool) -> SmallCNN:
    """Trains a SmallCNN from scratch on (x, y) with SGD + OneCycle; random horizontal flips when ``flip``."""
    torch.manual_seed(seed)
    model = SmallCNN(in_ch, widths)
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    opt, sched = sgd_onecycle(model.parameters(), lr, wd, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
            idx = perm[b:b + batch_size]
            xb = x[idx]
            if flip:
                mask = torch.rand(idx.shape[0], generator=gen) < 0.5
                xb = torch.where(mask.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def cnn_apply(model: SmallCNN, x_u8: np.ndarray, mean: np.ndarray, std: np.ndarray, *, what: str,
              chunk: int = 1000) -> np.ndarray:
    """Eval-mode features (``what='features'``) or logits of uint8 images, chunk by chunk."""
    model.eval()
    out = []
    for s in range(0, x_u8.shape[0], chunk):
        xb = to_float(np.asarray(x_u8[s:s + chunk]), mean, std)
        out.append((model.features(xb) if what == "features" else model(xb)).numpy())
    return np.concatenate(out).astype(np.float32)


def train_eval_mlps(feat: torch.Tensor, y: torch.Tensor, subsets: list[np.ndarray], seeds: list[int],
                    test_feat: torch.Tensor, test_y: torch.Tensor, p: Protocol,
                    total_steps: int | None = None) -> np.ndarray:
    """Trains one MLP per (subset, seed) pair, all together; returns test predictions [M, T] in order.

    ``total_steps`` None: ``p.epochs`` epochs over the subset (equal epochs); else that many SGD steps (equal steps).
    Subsets must have equal sizes (one batched model = one number of steps)."""
    m = {len(s) for s in subsets}
    if len(m) != 1:
        raise ValueError(f"batched training needs equal subset sizes, got {sorted(m)}")
    size = m.pop()
    n_models = len(subsets)
    model = BatchedMLP(seeds, feat.shape[1], p.hidden)
    steps_per_epoch = math.ceil(size / p.batch_size)
    total = total_steps if total_steps is not None else p.epochs * steps_per_epoch
    opt, sched = sgd_onecycle(model.parameters(), p.lr, p.weight_decay, total)
    sub = torch.as_tensor(np.stack(subsets), dtype=torch.long)
    gens = [torch.Generator().manual_seed(10_000 + int(s)) for s in seeds]
    done = 0
    while done < total:
        order = sub.gather(1, torch.stack([torch.randperm(size, generator=g) for g in gens]))
        for b in range(0, size, p.batch_size):
            if done == total:
                break
            done += 1
            ids = order[:, b:b + p.batch_size]
            logits = model(feat[ids])
            # Sum over models of each model's mean batch loss: the models' gradients stay independent.
            loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), y[ids].reshape(-1), reduction="sum") / ids.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return model(test_feat.unsqueeze(0).expand(n_models, -1, -1)).argmax(-1).numpy()


def train_eval_cnns(x: torch.Tensor, y: torch.Tensor, subsets: list[np.ndarray], seeds: list[int],
                    x_test: torch.Tensor, y_test: torch.Tensor, p: Protocol, in_ch: int,
                    total_steps: int | None = None) -> np.ndarray:
    """The ``--learner cnn`` path: one SmallCNN from pixels per (subset, seed), with flips; test predictions [M, T].
    Equal steps (``total_steps``) are rounded up to whole epochs of the subset."""
    preds = []
    for sub, seed in zip(subsets, seeds):
        idx = torch.as_tensor(sub, dtype=torch.long)
        epochs = p.epochs if total_steps is None else max(1, math.ceil(total_steps / math.ceil(len(sub) / p.batch_size)))
        model = train_cnn(x[idx], y[idx], in_ch=in_ch, widths=p.cnn_widths, epochs=epochs, lr=p.cnn_lr,
                          wd=p.weight_decay, batch_size=p.batch_size, seed=10_000 + seed, flip=True)
        with torch.no_grad():
            preds.append(torch.cat([model(x_test[s:s + 1000]).argmax(1) for s in range(0, x_test.shape[0], 1000)]).numpy())
    return np.stack(preds)


# ----------------------------------------------------------------------------------------------------------------------
# One dataset
# ----------------------------------------------------------------------------------------------------------------------


def prepare(name: str, p: Protocol) -> dict[str, Any]:
    """Split, feature CNN (cached), features of pool and test."""
    t0 = time.perf_counter()
    d = load_dataset(name)
    rng = np.random.default_rng(p.split_seed)
    ref_idx, pool_idx = balanced_split(d["y_train"], p.ref_size, rng)
    if p.pool_size is not None:
        keep, _ = balanced_split(d["y_train"][pool_idx], p.pool_size, rng)
        pool_idx = pool_idx[keep]
    test_idx = np.arange(d["y_test"].size)
    if p.test_size is not None:
        test_idx, _ = balanced_split(d["y_test"], p.test_size, rng)
    x_ref = np.asarray(d["x_train"][ref_idx])
    mean, std = channel_stats(x_ref)
    in_ch = 1 if x_ref.ndim == 3 else x_ref.shape[-1]

    key_src = json.dumps({"name": name, "ref": p.ref_size, "pool": p.pool_size, "test": p.test_size,
                          "w": p.cnn_widths, "e": p.feat_epochs, "lr": p.feat_lr, "flip": p.feat_flip,
                          "wd": p.weight_decay, "bs": p.batch_size, "seed": p.split_seed, "torch": torch.__version__},
                         sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    cache = CACHE_DIR / f"features_{name}_{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            feat_pool, feat_test, ref_test_acc = z["pool"], z["test"], float(z["ref_test_acc"])
            trained_seconds = float(z["seconds"]) if "seconds" in z.files else float("nan")
        log(f"{name}: features from cache {cache.name}")
        feat_seconds = 0.0
    else:
        log(f"{name}: training the feature CNN on the {ref_idx.size}-image reference split, {p.feat_epochs} epochs")
        t1 = time.perf_counter()
        cnn = train_cnn(to_float(x_ref, mean, std), torch.from_numpy(d["y_train"][ref_idx]), in_ch=in_ch,
                        widths=p.cnn_widths, epochs=p.feat_epochs, lr=p.feat_lr, wd=p.weight_decay,
                        batch_size=p.batch_size, seed=p.split_seed, flip=p.feat_flip)
        log(f"{name}: feature CNN trained in {time.perf_counter() - t1:.0f}s; extracting features")
        feat_pool = cnn_apply(cnn, d["x_train"][pool_idx], mean, std, what="features")
        x_test_u8 = np.asarray(d["x_test"][test_idx])
        feat_test = cnn_apply(cnn, x_test_u8, mean, std, what="features")
        ref_test_acc = 100.0 * float((cnn.head(torch.from_numpy(feat_test)).argmax(1).numpy()
                                      == d["y_test"][test_idx]).mean())
        feat_seconds = time.perf_counter() - t1
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
        trained_seconds = feat_seconds
        np.savez(tmp, pool=feat_pool, test=feat_test, ref_test_acc=ref_test_acc, seconds=feat_seconds)
        os.replace(tmp, cache)
        log(f"{name}: features done in {feat_seconds:.0f}s (feature CNN test acc {ref_test_acc:.2f}%)")
    out: dict[str, Any] = {
        "name": name, "in_ch": in_ch, "mean": mean, "std": std,
        "pool_idx": pool_idx, "y_pool": d["y_train"][pool_idx], "y_test": d["y_test"][test_idx],
        "feat_pool": feat_pool, "feat_test": feat_test, "ref_test_acc": ref_test_acc,
        "seconds": {"prepare": time.perf_counter() - t0, "feature_cnn": feat_seconds,
                    "feature_cnn_when_trained": trained_seconds},
    }
    if p.learner == "cnn":
        out["x_pool"] = to_float(np.asarray(d["x_train"][pool_idx]), mean, std)
        out["x_test"] = to_float(np.asarray(d["x_test"][test_idx]), mean, std)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def model_mode(data: dict[str, Any], labels: np.ndarray, p: Protocol, feat_std: np.ndarray, *,
               grand: bool = True) -> Any:
    """EL2N/GraNd/AUM from the learner architecture, early in training (scorers.el2n.el2n_model_scores)."""
    y_t = torch.as_tensor(labels, dtype=torch.long)
    if p.learner == "cnn":
        ds = torch.utils.data.TensorDataset(data["x_pool"], y_t)
        factory: Callable[[], nn.Module] = lambda: SmallCNN(data["in_ch"], p.cnn_widths)  # noqa: E731
        lr = p.cnn_lr
    else:
        ds = torch.utils.data.TensorDataset(torch.from_numpy(feat_std), y_t)
        factory = lambda: mlp(feat_std.shape[1], p.hidden)  # noqa: E731
        lr = p.score_lr
    return el2n_model_scores(factory, ds, n_seeds=p.score_seeds, epochs=p.score_epochs, lr=lr,
                             weight_decay=p.weight_decay, batch_size=p.batch_size, grand=grand, grand_params="all",
                             chunk_size=1024, record_aum=True, seed=0)


def compute_scores(data: dict[str, Any], p: Protocol, feat_std: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                                                      dict[str, Any]]:
    y = data["y_pool"]
    scores: dict[str, np.ndarray] = {"none": np.zeros(y.size, dtype=np.float32)}
    info: dict[str, Any] = {}
    t = time.perf_counter()
    res = model_mode(data, y, p, feat_std)
    scores["el2n_model"], scores["grand_model"] = res.el2n, res.grand
    scores["neg_aum_model"] = -res.aum
    info["model_mode"] = {k: v for k, v in res.info.items()}
    log(f"{data['name']}: model-mode EL2N/GraNd/AUM in {time.perf_counter() - t:.0f}s")
    t = time.perf_counter()
    emb = el2n_embedding_scores(unit_rows(data["feat_pool"]), y, head="linear", n_seeds=p.emb_seeds,
                                n_folds=p.emb_folds, seed=0)
    scores["el2n_emb"] = emb.el2n
    info["embedding_mode"] = dict(emb.info)
    log(f"{data['name']}: embedding-mode EL2N in {time.perf_counter() - t:.0f}s "
        f"(out-of-fold acc {emb.info.get('oof_accuracy_at_score_epoch', float('nan')):.3f})")
    t = time.perf_counter()
    unit = unit_rows(data["feat_pool"])
    km = spherical_kmeans(unit, KMeansParams(k=p.kmeans_k, seed=0))
    scores["prototype"] = prototype_scores(unit, km.centroids, keep="hard")
    info["prototypes"] = {"k": p.kmeans_k, "features": "L2-normalised CNN features", "keep": "hard",
                          "seconds": round(time.perf_counter() - t, 2)}
    for k, v in scores.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"score {k} has non-finite values")
    return scores, info


def label_noise_check(data: dict[str, Any], p: Protocol, feat_std: np.ndarray) -> dict[str, Any]:
    """Flip ``noise_rate`` of the pool labels; how many flipped samples land in the top 10 % of EL2N?"""
    t = time.perf_counter()
    y = data["y_pool"]
    rng = np.random.default_rng(12345)
    n = y.size
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(p.noise_rate * n)), replace=False)] = True
    y_noisy = y.copy()
    y_noisy[flipped] = (y[flipped] + rng.integers(1, N_CLASSES, size=int(flipped.sum()))) % N_CLASSES
    k = int(round(0.1 * n))

    def share_in_top(score: np.ndarray) -> float:
        top = np.argsort(-score, kind="stable")[:k]
        return round(float(flipped[top].sum()) / float(flipped.sum()), 4)

    res = model_mode(data, y_noisy, p, feat_std, grand=False)  # GraNd's per-sample gradients dominate the cost
    emb = el2n_embedding_scores(unit_rows(data["feat_pool"]), y_noisy, head="linear", n_seeds=p.emb_seeds,
                                n_folds=p.emb_folds, seed=0)
    out = {
        "noise_rate": p.noise_rate, "n_pool": n, "n_flipped": int(flipped.sum()), "top_k": k,
        "flipped_share_in_top10pct": {
            "el2n_model": share_in_top(res.el2n),
            "el2n_emb": share_in_top(emb.el2n), "aum_model_bottom10pct": share_in_top(-res.aum),
        },
        "chance": round(k / n, 4),
        "seconds": round(time.perf_counter() - t, 1),
    }
    log(f"{data['name']}: label-noise check {out['flipped_share_in_top10pct']} in {out['seconds']}s")
    return out


def run_dataset(name: str, p: Protocol, seeds: list[int], fractions: list[float], methods: list[str],
                threads: int) -> dict[str, Any]:
    t_all = time.perf_counter()
    log(f"=== {name}: protocol {asdict(p)}")
    data = prepare(name, p)
    mu, sd = data["feat_pool"].mean(0), data["feat_pool"].std(0) + 1e-6
    feat_std = ((data["feat_pool"] - mu) / sd).astype(np.float32)
    test_std = torch.from_numpy(((data["feat_test"] - mu) / sd).astype(np.float32))
    y_pool, y_test = data["y_pool"], data["y_test"]
    log(f"{name}: pool {y_pool.size}, test {y_test.size}")

    t = time.perf_counter()
    scores, score_info = compute_scores(data, p, feat_std)
    score_seconds = time.perf_counter() - t
    noise = label_noise_check(data, p, feat_std)

    # Selections: one kept-index array per (method, fraction, seed).
    unit = unit_rows(data["feat_pool"])
    jobs: list[tuple[str, float, int, np.ndarray]] = []
    sel_info: dict[str, dict[str, Any]] = {}
    auto_evidence: dict[str, Any] = {}
    for frac in fractions:
        for method in methods:
            score_name, rule, knobs = METHODS[method]
            if rule == "auto":  # winnow's default: the rule chosen by held-out probe evidence on the pool (seed 0)
                from pipeline.evaluate import choose_rule

                ev = choose_rule(unit, y_pool, scores[score_name], int(math.floor(frac * y_pool.size + 0.5)), seed=0)
                auto_evidence[f"{frac:g}"] = {"rule": ev["rule"], "why": ev["why"], "seconds": ev["seconds"],
                                              "accuracy": {r: v["accuracy"] for r, v in ev["table"].items()}}
                rule = ev["rule"]
                log(f"{name}: auto @ {frac:g} -> {rule} ({ev['why']})")
                knobs = {k: v for k, v in knobs.items() if rule == "ccs"}
                if rule == "moderate":
                    knobs = {"embeddings": "features"}
            for seed in seeds:
                kw: dict[str, Any] = {"keep_fraction": frac, "rule": rule, "labels": y_pool, "class_balanced": True,
                                      "seed": seed}
                kw.update({k: (unit if v == "features" else scores[v]) for k, v in knobs.items()})
                sel = select(None if rule in ("random", "moderate") else scores[score_name], **kw)
                keep = np.flatnonzero(np.asarray(sel.keep))
                jobs.append((method, frac, seed, keep))
                if seed == seeds[0]:
                    sel_info[f"{method}@{frac:g}"] = {"rule": sel.rule, "why": sel.why, "n_kept": int(keep.size)}
    full = np.arange(y_pool.size)
    jobs += [("full", 1.0, seed, full) for seed in seeds]

    # Identical (subset, seed) pairs train once: e.g. auto_el2n resolves to ccs_el2n below 70 % kept and to
    # el2n_model at 70 %, and deterministic rules keep the same subset for every seed.
    unique: dict[tuple[str, int], int] = {}
    job_to_unique = []
    for method, frac, seed, keep in jobs:
        k = (hashlib.sha1(keep.astype(np.int64).tobytes()).hexdigest(), seed)
        job_to_unique.append(unique.setdefault(k, len(unique)))
    first_job = {u: i for i, u in reversed(list(enumerate(job_to_unique)))}

    # Train: one batched run per kept size (all methods and seeds of a fraction share it), under both protocols.
    by_size: dict[int, list[int]] = {}
    for u, i in sorted(first_job.items()):
        by_size.setdefault(jobs[i][3].size, []).append(i)
    feat_t, ypool_t, ytest_t = torch.from_numpy(feat_std), torch.from_numpy(y_pool), torch.from_numpy(y_test)
    full_steps = p.epochs * math.ceil(y_pool.size / p.batch_size)
    protocols: dict[str, dict[str, Any]] = {}
    t_train = time.perf_counter()
    for proto, total_steps in (("equal_steps", full_steps), ("equal_epochs", None)):
        unique_correct: dict[int, np.ndarray] = {}
        for size, ids in sorted(by_size.items()):
            t = time.perf_counter()
            subsets, model_seeds = [jobs[i][3] for i in ids], [jobs[i][2] for i in ids]
            if p.learner == "cnn":
                preds = train_eval_cnns(data["x_pool"], ypool_t, subsets, model_seeds, data["x_test"], ytest_t, p,
                                        data["in_ch"], total_steps)
            else:
                preds = train_eval_mlps(feat_t, ypool_t, subsets, model_seeds, test_std, ytest_t, p, total_steps)
            for i, pr in zip(ids, preds):
                unique_correct[job_to_unique[i]] = pr == y_test
            log(f"{name} [{proto}]: trained {len(ids)} models on {size} samples in {time.perf_counter() - t:.0f}s")
        acc: dict[str, dict[str, list[float]]] = {}
        correct: dict[str, dict[str, list[np.ndarray]]] = {}
        for (method, frac, seed, _), u in zip(jobs, job_to_unique):
            acc.setdefault(method, {}).setdefault(f"{frac:g}", []).append(round(100.0 * float(unique_correct[u].mean()), 3))
            correct.setdefault(method, {}).setdefault(f"{frac:g}", []).append(unique_correct[u])
        protocols[proto] = {"accuracy": acc, "steps": total_steps, "vs_random": paired_vs_random(correct, fractions),
                            "summary": summarise(acc, fractions)}
    train_seconds = time.perf_counter() - t_train
    acc = protocols["equal_steps"]["accuracy"]
    summary = summarise(acc, fractions)
    for line in format_table(name, summary, fractions, acc).splitlines():
        log(line)
    return {
        "dataset": name, "protocol": asdict(p), "seeds": seeds, "fractions": fractions, "methods": methods,
        "method_rules": {m: {"score": METHODS[m][0], "rule": METHODS[m][1], "knobs": METHODS[m][2]} for m in methods},
        "pool_size": int(y_pool.size), "test_size": int(y_test.size), "n_trainings": len(unique),
        "feature_cnn_test_accuracy": round(data["ref_test_acc"], 3),
        "accuracy": acc, "summary": summary, "protocols": protocols, "auto_evidence": auto_evidence,
        "prechosen": PRECHOSEN, "score_distribution": score_distribution(scores),
        "selection": sel_info, "scores": score_info, "label_noise": noise,
        "seconds": {"total": round(time.perf_counter() - t_all, 1), "scores": round(score_seconds, 1),
                    "training": round(train_seconds, 1),
                    **{k: round(v, 1) for k, v in data["seconds"].items()}},
        "env": {"torch": torch.__version__, "threads": threads, "python": platform.python_version(),
                "machine": platform.machine(), "cpus": os.cpu_count()},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def paired_vs_random(correct: dict[str, dict[str, list[np.ndarray]]], fractions: list[float]) -> dict[str, Any]:
    """Every method minus random per fraction: paired bootstrap 95% CI over the test rows and seeds (pp)."""
    from pipeline.evaluate import paired_bootstrap

    out: dict[str, Any] = {}
    for method, per in correct.items():
        if method in ("random", "full"):
            continue
        for frac in fractions:
            f = f"{frac:g}"
            cmp = paired_bootstrap(np.stack(per[f]), np.stack(correct["random"][f]), n_boot=2000)
            out.setdefault(method, {})[f] = {"diff_pp": round(100 * cmp["difference"], 3),
                                             "ci_pp": [round(100 * v, 3) for v in cmp["difference_ci"]],
                                             "p_value": cmp["p_value"]}
    return out


def score_distribution(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Quantiles of each score and, for CCS, how many of its 50 equal-width bins over the score range are empty."""
    out = {}
    for name, v in scores.items():
        if name == "none":
            continue
        v = np.asarray(v, dtype=np.float64)
        lo, hi = float(v.min()), float(v.max())
        bins = np.minimum(((v - lo) / (hi - lo) * 50).astype(int), 49) if hi > lo else np.zeros(v.size, int)
        out[name] = {"q10": float(np.quantile(v, 0.1)), "median": float(np.median(v)), "q90": float(np.quantile(v, 0.9)),
                     "ccs_empty_bins_of_50": int((np.bincount(bins, minlength=50) == 0).sum())}
    return out


def mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(acc: dict[str, dict[str, list[float]]], fractions: list[float]) -> dict[str, Any]:
    """Per fraction: the best non-random method, its margin over random, and the 2-std test."""
    out: dict[str, Any] = {}
    full_m, _ = mean_std(acc["full"]["1"])
    for frac in fractions:
        f = f"{frac:g}"
        if "random" not in acc:
            break
        r_m, r_s = mean_std(acc["random"][f])
        best = max((m for m in acc if m not in ("random", "full")), key=lambda m: mean_std(acc[m][f])[0],
                   default=None)
        if best is None:
            continue
        b_m, b_s = mean_std(acc[best][f])
        out[f] = {"best": best, "best_mean": round(b_m, 3), "best_std": round(b_s, 3), "random_mean": round(r_m, 3),
                  "random_std": round(r_s, 3), "margin_pp": round(b_m - r_m, 3),
                  "beats_random_2std": bool(b_m - r_m > 2 * max(b_s, r_s)),
                  "best_minus_full_pp": round(b_m - full_m, 3), "random_minus_full_pp": round(r_m - full_m, 3)}
    return out


def format_table(name: str, summary: dict[str, Any], fractions: list[float],
                 acc: dict[str, dict[str, list[float]]] | None = None) -> str:
    cols = [f"{frac:g}" for frac in fractions]
    head = "| method | " + " | ".join(f"{100 * float(c):g}% kept" for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    if acc is not None:
        for method, per in acc.items():
            if method == "full":
                continue
            cells = []
            for c in cols:
                m, s = mean_std(per[c])
                best = summary.get(c, {}).get("best") == method
                cells.append(f"**{m:.2f} ± {s:.2f}**" if best else f"{m:.2f} ± {s:.2f}")
            label = f"★ {method} (chosen in advance)" if method == PRECHOSEN else method
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        m, s = mean_std(acc["full"]["1"])
        lines.append(f"| full data (100%) | {m:.2f} ± {s:.2f}" + " |" * len(cols))
    lines.append("")
    lines.append("| kept | best method | best − random (pp) | > 2 std? | best − full (pp) | random − full (pp) |")
    lines.append("|---|---|---|---|---|---|")
    for c in cols:
        if c in summary:
            s = summary[c]
            lines.append(f"| {100 * float(c):g}% | {s['best']} | {s['margin_pp']:+.2f} | "
                         f"{'yes' if s['beats_random_2std'] else 'no'} | {s['best_minus_full_pp']:+.2f} | "
                         f"{s['random_minus_full_pp']:+.2f} |")
    return "\n".join(lines)


def write_markdown(results: list[dict[str, Any]], path: Path) -> None:
    p0 = results[0]["protocol"]
    learner = (f"an MLP 128→{p0['hidden']}→10 on those frozen CNN features" if p0["learner"] == "mlp"
               else "the same small CNN from pixels")
    doc = [
        "# Prune, then train (benchmarks/prune_then_train.py)",
        "",
        "Test accuracy (%) on the test set of a learner trained on the kept part of the pool, mean ± std "
        "(ddof 1) over seeds. The protocol is in the script's docstring; in short: a small CNN (conv "
        f"{'-'.join(map(str, p0['cnn_widths']))} + BN + max-pool) is trained from scratch on a class-balanced "
        "*reference* split of the training set and frozen; the *pool* is the rest of the training set (never seen by "
        f"the CNN); every kept subset of the pool trains {learner} for the same number of epochs "
        f"({p0['epochs']}, SGD + one-cycle lr) at every kept fraction. Scores, computed once on the pool: EL2N / GraNd / "
        f"AUM in model mode (the learner itself, {p0['score_seeds']} seeds × {p0['score_epochs']} epochs), EL2N in "
        f"embedding mode (linear heads, {p0['emb_folds']}-fold out-of-fold, {p0['emb_seeds']} seeds, on the "
        f"L2-normalised CNN features), prototypes (spherical k-means k={p0['kmeans_k']} on the same features, keep "
        "hard), Moderate on the same features. All selections class-balanced with an exact budget "
        "(`scorers.select.select`). Seeds vary the learner's init and batch order and the sampling of random and CCS; "
        "the scores are fixed.",
        "",
        "The std covers the learner seeds (and the subset draw of random and CCS), not the sampling error of the test "
        "set (binomial SE ≈ 0.3-0.5 pp at these accuracies on 10k images, smaller for paired differences).",
        "",
        "**Bold** = best non-random method at that fraction. \"> 2 std\" = best − random > 2 × max(std_best, "
        "std_random). Picking the best of nine methods after the fact favours it; ★ `auto_el2n` (model-mode EL2N with "
        "`rule: auto`, the rule chosen by held-out evidence: what winnow does by default) is the row chosen in advance.",
        "",
    ]
    for r in results:
        p = r["protocol"]
        secs = r["seconds"]
        doc += [
            f"## {r['dataset']}",
            "",
            f"Pool {r['pool_size']} images, test {r['test_size']}, reference split {p['ref_size']} "
            f"(feature CNN: {p['feat_epochs']} epochs{', random flips' if p['feat_flip'] else ''}; as a classifier "
            f"it scores {r['feature_cnn_test_accuracy']:.2f}% on the test set), learner `{p['learner']}`, "
            f"{p['epochs']} epochs, seeds {r['seeds']}. Wall time {secs['total']:.0f} s (feature CNN "
            f"{secs['feature_cnn']:.0f} s"
            + (f" (cached; training + feature extraction took {secs.get('feature_cnn_when_trained', float('nan')):.0f} s "
               "when it ran)" if secs["feature_cnn"] == 0 else "")
            + f", scores {secs['scores']:.0f} s, "
            f"{r.get('n_trainings', '?')} distinct trainings {secs['training']:.0f} s).",
            "",
            "**Equal SGD steps (headline)**" + (f": every subset trains {r['protocols']['equal_steps']['steps']} steps, "
                                               "the full pool's budget" if "protocols" in r else ""),
            "",
            format_table(r["dataset"], r["summary"], r["fractions"], r["accuracy"]),
            "",
        ]
        if "protocols" in r:
            vs = r["protocols"]["equal_steps"]["vs_random"]
            doc += ["Method − random, equal steps (pp), paired bootstrap 95% CI over the test rows and seeds:", "",
                    "| method | " + " | ".join(f"{100 * f:g}% kept" for f in r["fractions"]) + " |",
                    "|---" * (len(r["fractions"]) + 1) + "|"]
            for method, per in vs.items():
                label = f"★ {method}" if method == PRECHOSEN else method
                doc.append(f"| {label} | " + " | ".join(
                    f"{per[f'{f:g}']['diff_pp']:+.2f} [{per[f'{f:g}']['ci_pp'][0]:+.2f}, {per[f'{f:g}']['ci_pp'][1]:+.2f}]"
                    for f in r["fractions"]) + " |")
            ee = r["protocols"]["equal_epochs"]
            doc += ["", f"**Equal epochs** ({p['epochs']} epochs over each subset, so a 10% subset gets 10% of the steps):", "",
                    format_table(r["dataset"], ee["summary"], r["fractions"], ee["accuracy"]), ""]
            if r.get("auto_evidence"):
                doc += ["`auto_el2n`'s rule per fraction (chosen on the pool by pipeline.evaluate.choose_rule, held-out "
                        "linear probes): " + "; ".join(f"{100 * float(f):g}%: {v['rule']}" for f, v in r["auto_evidence"].items()) + ".", ""]
            dist = r.get("score_distribution", {})
            if dist:
                doc += ["Score distributions (scored after " + f"{p['score_epochs']} epoch(s)): " + "; ".join(
                    f"{k} median {v['median']:.3g} (q10 {v['q10']:.3g}, q90 {v['q90']:.3g}), {v['ccs_empty_bins_of_50']}/50 CCS bins empty"
                    for k, v in dist.items()) + ".", ""]
        if PRECHOSEN in r["accuracy"]:
            cells = []
            for f in r["fractions"]:
                m, sd = mean_std(r["accuracy"][PRECHOSEN][f"{f:g}"])
                rm, rs = mean_std(r["accuracy"]["random"][f"{f:g}"])
                verdict = "beats" if m - rm > 2 * max(sd, rs) else ("loses to" if rm - m > 2 * max(sd, rs) else "ties")
                cells.append(f"{100 * f:g}%: {m - rm:+.2f} pp ({verdict} random)")
            doc += [f"winnow default ({PRECHOSEN}, equal steps) − random: " + "; ".join(cells) + ".", ""]
        doc += [
            "Rules: " + ", ".join(f"{m} = {v['rule']}({v['score']}"
                                 + "".join(f", {k}={kv}" for k, kv in v.get("knobs", {}).items()) + ")"
                                 for m, v in r["method_rules"].items()) + ".",
            "",
        ]
        noise = r["label_noise"]
        shares = noise["flipped_share_in_top10pct"]
        doc += [
            f"Label-noise check ({100 * noise['noise_rate']:g}% of the pool flipped, {noise['n_flipped']} samples): "
            "share of the flipped samples in the top 10% of the score (chance "
            f"{100 * noise['chance']:.0f}%, perfect 100%): "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()) + ".",
            "",
        ]
    doc += [f"![accuracy vs kept fraction]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(doc))


def write_plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        xs = [100 * f for f in r["fractions"]]
        for method, per in r["accuracy"].items():
            if method == "full":
                continue
            ms = [mean_std(per[f"{f:g}"]) for f in r["fractions"]]
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if method == "random" else {}
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", markersize=3, capsize=2,
                        label=method, **style)
        fm, fs = mean_std(r["accuracy"]["full"]["1"])
        ax.axhline(fm, color="grey", linestyle=":", label=f"full data {fm:.2f}")
        ax.set_title(f"{r['dataset']}: pool {r['pool_size']}, learner {r['protocol']['learner']}")
        ax.set_xlabel("kept fraction of the pool (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def parse_fractions(text: str) -> list[float]:
    vals = []
    for part in text.split(","):
        v = float(part)
        v = v / 100.0 if v > 1 else v
        if not 0 < v < 1:
            raise argparse.ArgumentTypeError(f"kept fraction {part!r} must be in (0, 1) or (0, 100)%; 100% always runs")
        vals.append(round(v, 6))
    return sorted(set(vals))


def parse_seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2]; ``0,5,7`` -> those seeds."""
    if "," not in text:
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError("--seeds must be >= 1")
        return list(range(n))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    ap.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="a count (3 = seeds 0,1,2) or a list")
    ap.add_argument("--fractions", type=parse_fractions, default=[0.1, 0.3, 0.5, 0.7],
                    help="kept fractions, e.g. 10,30,50,70 or 0.1,0.3 (full data always runs)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--learner", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--pool-size", type=int, default=None,
                    help="a class-balanced pool of this many images (default: the dataset's; the CNN learner on a 2-core "
                         "machine needs a smaller pool)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 1 min)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from the JSON results already in the folder")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                                                           "--quick: benchmarks/.cache/quick_results)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if "random" not in methods:
        methods.insert(0, "random")
    torch.set_num_threads(args.threads)
    out = args.out or (CACHE_DIR / "quick_results" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    names = DATASETS if args.dataset == "both" else (args.dataset,)
    t0 = time.perf_counter()
    for name in [] if args.report_only else names:
        p = replace((QUICK if args.quick else FULL)[name], learner=args.learner)
        if args.pool_size is not None:
            p = replace(p, pool_size=args.pool_size)
        result = run_dataset(name, p, args.seeds, args.fractions, methods, args.threads)
        path = out / f"prune_then_train_{name}.json"
        path.write_text(json.dumps(result, indent=1))
        log(f"wrote {path}")
    # The markdown and the plot cover every dataset with results in the folder (a one-dataset run keeps the other).
    results = [json.loads((out / f"prune_then_train_{n}.json").read_text()) for n in DATASETS
               if (out / f"prune_then_train_{n}.json").exists()]
    if not results:
        log(f"no results in {out}")
        return 1
    write_markdown(results, out / "prune_then_train.md")
    write_plot(results, out / "prune_then_train.png")
    log(f"wrote {out / 'prune_then_train.md'} and .png; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
