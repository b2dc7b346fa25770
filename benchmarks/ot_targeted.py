"""OT targeted selection (issue 5, TAROT-style): pick, from a mixed pool, the samples that serve a small target set.

Protocol (every number in benchmarks/results/ot_targeted.md comes from it)
---------------------------------------------------------------------------
- **Pool** (110k rows): CIFAR-10 train (50k, the shared JPEG re-encoding decoded with Pillow) + Fashion-MNIST train
  (60k, 28x28 grey zero-padded to 32x32 and repeated to 3 channels). Labels: CIFAR 0-9, Fashion-MNIST 10-19.
- **Target**: 100 CIFAR-10 *test* images of the classes airplane, automobile, ship (seeded draw). The pool holds 15k
  rows of those classes (13.6 %).
- **Selection features** (no pretrained encoder is available here):
  ``embedding`` = pixel-PCA, pixels in [0, 1] (3072-d) -> 64 dims fitted on a seeded 10k pool sample;
  ``gradient`` = per-sample gradients of a proxy linear softmax head (20 classes, trained on the pixel-PCA features
  and the pool labels), JL-projected (Rademacher) to 256 dims; target rows use the head's predicted label
  (``scorers.ot_select.fit_proxy_head`` / ``gradient_features``).
- **Methods**: ``ot`` = ``ot_scores`` (ZCA whitening fitted on 5k pool rows, ridge 1e-3, entropic OT eps 0.05 relative
  to the mean cost, 5k-row pool sample vs the 100 targets, c-transform streamed over all rows), top-k by score, at the
  fixed budget k = BUDGET and at k = the OTM estimate (gradient rows unit-normalised after whitening, as TAROT) (``estimate_selection_ratio``: TAROT's OT-distance minimisation,
  5 folds, per-target neighbourhoods, exact ``ot.emd2``); ``nn`` = top-k by max cosine similarity of the raw pixel-PCA
  features to any target row; ``random`` = uniform.
- **Learner**: a small CNN trained from scratch on the selected 32x32 RGB images (3 conv blocks 16-32-64 with BN,
  ReLU, max-pool; global 2x2 pool; linear to 20 classes), Adam 2e-3, batch 128, random horizontal flips, STEPS
  steps whatever the selection size (equal compute); reported = accuracy (%) on the 2900 CIFAR-10 test images of the target classes that are not in the target
  set (20-way; chance 5 %), mean +- std over SEEDS (init, batch order).
- **Timing**: wall time of ``ot_scores`` (whitening fit + potentials + streaming) and of the gradient features, per
  100k pool rows, on this 2-core shared CPU.

Usage: ``nice -n 5 python benchmarks/ot_targeted.py`` (the CNN trainings dominate the wall time).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common_data import load_cifar10, load_fmnist  # noqa: E402
from scorers.ot_select import estimate_selection_ratio, fit_proxy_head, gradient_features, ot_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_CLASSES = (0, 1, 8)  # airplane, automobile, ship
N_TARGET = 100
PCA_DIM = 64
BUDGET = 5000  # fixed budget (a third of the 15k in-domain rows)
SEEDS = (0, 1)
STEPS = 200  # SGD steps per training, the same for every selection (equal compute; ~5 epochs of BUDGET rows)
GRAD_DIM = 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data() -> dict[str, Any]:
    c, f = load_cifar10(), load_fmnist()
    fm = np.zeros((f["x_train"].shape[0], 32, 32, 3), np.uint8)
    fm[:, 2:30, 2:30, :] = f["x_train"][..., None]
    x_pool = np.concatenate([np.asarray(c["x_train"]), fm])
    y_pool = np.concatenate([c["y_train"], f["y_train"] + 10])
    rng = np.random.default_rng(0)
    in_target = np.flatnonzero(np.isin(c["y_test"], TARGET_CLASSES))
    tgt_idx = np.sort(rng.choice(in_target, size=N_TARGET, replace=False))
    eval_idx = np.setdiff1d(in_target, tgt_idx)
    return {"x_pool": x_pool, "y_pool": y_pool, "x_target": np.asarray(c["x_test"][tgt_idx]),
            "x_eval": np.asarray(c["x_test"][eval_idx]), "y_eval": c["y_test"][eval_idx]}


def pca_features(d: dict[str, Any]) -> dict[str, np.ndarray]:
    """Pixel-PCA features (randomised SVD on a seeded 10k pool sample), cached under benchmarks/.cache."""
    from benchmarks.common_data import CACHE_DIR

    cache = CACHE_DIR / f"ot_targeted_pixpca{PCA_DIM}_{N_TARGET}_{'-'.join(map(str, TARGET_CLASSES))}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in ("pool", "target", "eval")}
    rng = np.random.default_rng(0)
    flat = lambda x: x.reshape(x.shape[0], -1).astype(np.float32) / 255.0  # noqa: E731
    samp = torch.from_numpy(flat(d["x_pool"][np.sort(rng.choice(d["x_pool"].shape[0], 10_000, replace=False))]))
    mean = samp.mean(0)
    torch.manual_seed(0)
    _, _, v = torch.svd_lowrank(samp - mean, q=PCA_DIM + 16, niter=3)
    comp = v[:, :PCA_DIM].numpy()
    mean_np = mean.numpy()
    proj = lambda x: np.concatenate([(flat(x[s:s + 20000]) - mean_np) @ comp  # noqa: E731
                                     for s in range(0, x.shape[0], 20000)])
    out = {"pool": proj(d["x_pool"]), "target": proj(d["x_target"]), "eval": proj(d["x_eval"])}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def make_cnn() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 20))


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() - 127.5) / 64.0


def train_cnn(x_pool: np.ndarray, y: np.ndarray, idx: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
              seed: int) -> float:
    """Small CNN from scratch on the selected images; accuracy (%) on the target classes' held-out test images."""
    torch.manual_seed(seed)
    idx = np.sort(idx)
    x = np.ascontiguousarray(x_pool[idx])  # uint8; batches are converted on the fly
    t = torch.from_numpy(y[idx])
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < STEPS:
        perm = torch.randperm(x.shape[0], generator=gen)
        for b in range(0, x.shape[0] - 127, 128):
            if step >= STEPS:
                break
            step += 1
            i = perm[b:b + 128]
            xb = to_tensor(x[np.sort(i.numpy())])
            i = torch.from_numpy(np.sort(i.numpy()))
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), t[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        xe = to_tensor(x_eval)
        pred = torch.cat([model(xe[b:b + 1024]).argmax(1) for b in range(0, xe.shape[0], 1024)]).numpy()
    return 100.0 * float((pred == y_eval).mean())


def main() -> int:
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    log("loading data")
    d = build_data()
    t0 = time.perf_counter()
    feats = pca_features(d)
    log(f"pixel-PCA features in {time.perf_counter() - t0:.1f}s")
    pool, target = feats["pool"], feats["target"]
    y = d["y_pool"]
    n = pool.shape[0]
    is_tgt = np.isin(y, TARGET_CLASSES)
    share = float(is_tgt.mean())

    # Gradient features from a proxy linear head on the pixel-PCA features (pool labels; target: predicted labels).
    t0 = time.perf_counter()
    head = fit_proxy_head(pool, y, seed=0)
    t_head = time.perf_counter() - t0
    t0 = time.perf_counter()
    g_pool = gradient_features(pool, head, y, grad_dim=GRAD_DIM, seed=0)
    t_grad = time.perf_counter() - t0
    g_target = gradient_features(target, head, None, grad_dim=GRAD_DIM, seed=0)
    log(f"proxy head {t_head:.1f}s (train acc {head.info['train_acc']:.3f}), gradients {t_grad:.1f}s")
    spaces = {"embedding": (pool, target), "gradient": (g_pool, g_target)}

    timing: dict[str, Any] = {"proxy_head_fit_s": t_head, "gradient_features_per_100k_s": t_grad / n * 1e5}
    scores: dict[str, np.ndarray] = {}
    otm: dict[str, Any] = {}
    for name, (px, tx) in spaces.items():
        t0 = time.perf_counter()
        res = ot_scores(px, tx, eps=0.05, whiten=True, sample_size=5000, chunk=65536, seed=0, device="cpu",
                        normalize=name == "gradient")
        dt = time.perf_counter() - t0
        scores[name] = res.score
        timing[f"ot_scores_{name}_per_100k_s"] = dt / n * 1e5
        timing[f"ot_scores_{name}_breakdown_s"] = res.info["seconds"]
        log(f"ot_scores[{name}] {dt:.1f}s {res.info['seconds']}")
        t0 = time.perf_counter()
        est = estimate_selection_ratio(px, tx, k_folds=5, seed=0, device="cpu")
        dt = time.perf_counter() - t0
        sel = est.selected
        otm[name] = {"ratio": est.ratio, "k": est.k, "seconds": dt, "fold_ratios": est.info["fold_ratios"],
                     "fold_k": est.fold_choice, "k_grid": est.k_grid, "curve_ratio": est.ratios,
                     "curve_distance": est.distance, "union_target_class_share": float(is_tgt[sel].mean()),
                     "union_cifar_share": float((y[sel] < 10).mean())}
        log(f"OTM[{name}] ratio {est.ratio:.4f} (k={est.k}, union target share {is_tgt[sel].mean():.3f}) in {dt:.1f}s")

    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    tn = target / np.linalg.norm(target, axis=1, keepdims=True)
    nn_score = np.concatenate([(pn[s:s + 65536] @ tn.T).max(1) for s in range(0, n, 65536)])
    rng = np.random.default_rng(123)
    top = lambda sc, k: np.argsort(-sc, kind="stable")[:k]  # noqa: E731
    selections = [
        ("ot", "embedding", "fixed", top(scores["embedding"], BUDGET)),
        ("ot", "embedding", "OTM", top(scores["embedding"], otm["embedding"]["k"])),
        ("ot", "gradient", "fixed", top(scores["gradient"], BUDGET)),
        ("ot", "gradient", "OTM", top(scores["gradient"], otm["gradient"]["k"])),
        ("nn", "embedding", "fixed", top(nn_score, BUDGET)),
        ("random", "-", "fixed", rng.choice(n, size=BUDGET, replace=False)),
    ]
    rows: list[dict[str, Any]] = []
    for method, space, mode, idx in selections:
        t0 = time.perf_counter()
        accs = [train_cnn(d["x_pool"], y, idx, d["x_eval"], d["y_eval"], s) for s in SEEDS]
        rows.append({"method": method, "features": space, "budget": mode, "k": int(idx.size),
                     "target_class_share": float(is_tgt[idx].mean()), "cifar_share": float((y[idx] < 10).mean()),
                     "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs, ddof=1)), "acc": accs})
        log(f"{method}/{space}/{mode} k={idx.size}: target share {rows[-1]['target_class_share']:.3f}, "
            f"acc {np.mean(accs):.2f} ({time.perf_counter() - t0:.0f}s)")
    timing["total_s"] = time.perf_counter() - t_all
    out = {
        "protocol": {"pool": "CIFAR-10 train 50k + Fashion-MNIST train 60k (32x32 RGB)", "target_classes":
                     ["airplane", "automobile", "ship"], "n_target": N_TARGET,
                     "features": {"embedding": f"pixel-PCA {PCA_DIM}",
                                  "gradient": f"proxy linear head on pixel-PCA {PCA_DIM}, JL {GRAD_DIM}"},
                     "learner": f"CNN 16-32-64 (BN) from scratch on the selected images, Adam 2e-3, batch 128, "
                                f"flips, {STEPS} steps (same for every selection)", "seeds": list(SEEDS), "eps": 0.05, "budget": BUDGET,
                     "pool_target_class_share": share},
        "otm": otm, "timing": timing, "proxy_head": head.info, "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": 2},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ot_targeted.json").write_text(json.dumps(out, indent=2))
    write_md(out)
    log(f"done in {timing['total_s']:.0f}s")
    return 0


def write_md(out: dict[str, Any]) -> None:
    p, tm, o = out["protocol"], out["timing"], out["otm"]
    lines = [
        "# OT targeted selection (TAROT-style) — CIFAR-10 + Fashion-MNIST pool, 3-class CIFAR target",
        "",
        f"Pool: {p['pool']} (target classes = {100 * p['pool_target_class_share']:.1f} % of it). Target: "
        f"{p['n_target']} CIFAR-10 test images of {', '.join(p['target_classes'])}. Selection features: "
        f"**embedding = {p['features']['embedding']}**, **gradient = {p['features']['gradient']}** (no pretrained "
        f"encoder here). Learner: {p['learner']}; accuracy on the other 2900 CIFAR-10 test images of the target "
        f"classes (20-way, chance 5 %), mean ± std over seeds {p['seeds']}. Protocol: benchmarks/ot_targeted.py.",
        "",
        "| method | selection features | budget | k kept | share from target classes | share CIFAR | CNN acc on target classes % |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        budget = "fixed" if r["budget"] == "fixed" else "OTM-estimated"
        lines.append(f"| {r['method']} | {r['features']} | {budget} | {r['k']} | {r['target_class_share']:.3f} | "
                     f"{r['cifar_share']:.3f} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} |")
    lines += ["", "OTM (TAROT OT-distance minimisation: 5 folds over the target, per-target neighbourhoods, exact W1 on "
              "whitened unit features to the other 4 folds, union of the fold selections):", "",
              "| features | estimated ratio | k | true target-class share | union's target-class share | union's CIFAR share | per-fold ratios | s |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, e in o.items():
        lines.append(f"| {name} | {e['ratio']:.4f} | {e['k']} | {p['pool_target_class_share']:.3f} | "
                     f"{e['union_target_class_share']:.3f} | {e['union_cifar_share']:.3f} | "
                     f"{', '.join(f'{v:.4f}' for v in e['fold_ratios'])} | {e['seconds']:.1f} |")
    lines += [
        "",
        f"Timing (2 shared CPU cores, no GPU), per 100k pool rows: ot_scores on the 64-d embedding "
        f"**{tm['ot_scores_embedding_per_100k_s']:.2f} s**, on the 256-d gradients "
        f"**{tm['ot_scores_gradient_per_100k_s']:.2f} s** (+ {tm['gradient_features_per_100k_s']:.2f} s to compute "
        f"the projected gradients; proxy head fit {tm['proxy_head_fit_s']:.1f} s once). Whole benchmark "
        f"{tm['total_s']:.0f} s.",
        "",
    ]
    (RESULTS / "ot_targeted.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
