"""OT targeted selection (issue 5, TAROT-style): pick, from a mixed pool, the samples that serve a small target set.

Protocol (every number in benchmarks/results/ot_targeted.md comes from it)
---------------------------------------------------------------------------
- **Pool** (110k rows): CIFAR-10 train (50k, the shared JPEG re-encoding decoded with Pillow) + Fashion-MNIST train
  (60k, 28x28 grey zero-padded to 32x32 and repeated to 3 channels). Labels: CIFAR 0-9, Fashion-MNIST 10-19.
- **Target**: 100 CIFAR-10 *test* images of the classes airplane, automobile, ship (seeded draw). The pool holds 15k
  rows of those classes (13.6 %).
- **Features**: pixel-PCA — pixels in [0, 1] (3072-d), PCA to 64 dims fitted on a seeded 10k sample of the pool. No
  pretrained encoder is available here, so these are weak features for CIFAR classes (they mostly carry colour and
  layout); the selection methods all see the same features.
- **Methods** (each keeps k pool rows): ``ot`` = ``scorers.ot_select.ot_scores`` (ZCA whitening fitted on 5k pool rows,
  ridge 1e-3, entropic OT eps 0.05 relative to the mean cost, 5k-row pool sample vs the 100 targets, c-transform
  streamed over all 110k rows), top-k by score; ``nn`` = top-k by max cosine similarity to any target row (raw PCA
  features); ``random`` = uniform. k = 5000 and 15000 (fixed budget), and k from TAROT's OT-distance minimisation
  (``estimate_selection_ratio``, 5 folds over the target, per-fold scores, exact ``ot.emd2`` on 1000-row subsamples).
- **Learner**: MLP 64 -> 256 (ReLU) -> 20 on the standardised features, Adam lr 1e-3, batch 512, 20 epochs, trained on
  the kept rows with their labels; reported = accuracy (%) on the 2900 CIFAR test images of the target classes that are
  not in the target set (chance among 20 classes: 5 %), mean +- std over seeds 0, 1, 2 (learner init and batch order).
- **Timing**: wall time of ``ot_scores`` over the 110k pool (whitening fit + potentials + streaming), per 100k rows.

Usage: ``python benchmarks/ot_targeted.py`` (measured 641 s on 2 busy shared cores with the CIFAR decode cached; the
scoring itself is seconds, the 36 MLP trainings are the rest).
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
from scorers.ot_select import estimate_selection_ratio, ot_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_CLASSES = (0, 1, 8)  # airplane, automobile, ship
N_TARGET = 100
PCA_DIM = 64
BUDGETS = (5000, 15000)
SEEDS = (0, 1, 2)
RATIOS = (0.01, 0.02, 0.05, 0.08, 0.1, 0.12, 0.14, 0.17, 0.2, 0.3, 0.5, 1.0)


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


def train_eval(feat: np.ndarray, y: np.ndarray, idx: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
               mu: np.ndarray, sd: np.ndarray, seed: int) -> float:
    torch.manual_seed(seed)
    x = torch.from_numpy((feat[idx] - mu) / sd).float()
    t = torch.from_numpy(y[idx])
    model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 20))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        perm = torch.randperm(x.shape[0], generator=gen)
        for b in range(0, x.shape[0], 512):
            i = perm[b:b + 512]
            loss = nn.functional.cross_entropy(model(x[i]), t[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = model(torch.from_numpy((x_eval - mu) / sd).float()).argmax(1).numpy()
    return 100.0 * float((pred == y_eval).mean())


def main() -> int:
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    log("loading data")
    d = build_data()
    t0 = time.perf_counter()
    feats = pca_features(d)
    t_feat = time.perf_counter() - t0
    log(f"pixel-PCA features in {t_feat:.1f}s")
    pool, target = feats["pool"], feats["target"]
    y = d["y_pool"]
    n = pool.shape[0]
    is_tgt = np.isin(y, TARGET_CLASSES)

    t0 = time.perf_counter()
    res = ot_scores(pool, target, eps=0.05, whiten=True, sample_size=5000, chunk=65536, seed=0)
    t_ot = time.perf_counter() - t0
    log(f"ot_scores {t_ot:.1f}s: {res.info['seconds']}")
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    tn = target / np.linalg.norm(target, axis=1, keepdims=True)
    t0 = time.perf_counter()
    nn_score = np.concatenate([(pn[s:s + 65536] @ tn.T).max(1) for s in range(0, n, 65536)])
    t_nn = time.perf_counter() - t0

    t0 = time.perf_counter()
    est = estimate_selection_ratio(pool, target, ratios=RATIOS, k_folds=5, subsample=1000, sample_size=5000, seed=0)
    t_est = time.perf_counter() - t0
    log(f"OTM ratio {est.ratio} (k={est.k}) in {t_est:.1f}s; curve {np.round(est.distance, 4).tolist()}")
    # The same estimate on the 8 leading PCA dims: W2 between small empirical measures is less biased in low dim.
    t0 = time.perf_counter()
    est8 = estimate_selection_ratio(np.ascontiguousarray(pool[:, :8]), np.ascontiguousarray(target[:, :8]),
                                    ratios=RATIOS, k_folds=5, subsample=1000, sample_size=5000, seed=0)
    t_est8 = time.perf_counter() - t0
    log(f"OTM ratio (8-d) {est8.ratio} (k={est8.k}) in {t_est8:.1f}s; curve {np.round(est8.distance, 4).tolist()}")

    budgets = sorted(set(BUDGETS) | {est.k, est8.k})
    mu, sd = pool.mean(0), pool.std(0) + 1e-6
    rng = np.random.default_rng(123)
    rows: list[dict[str, Any]] = []
    for k in budgets:
        sel = {"ot": np.argsort(-res.score, kind="stable")[:k], "nn": np.argsort(-nn_score, kind="stable")[:k],
               "random": rng.choice(n, size=k, replace=False)}
        for name, idx in sel.items():
            accs = [train_eval(pool, y, idx, feats["eval"], d["y_eval"], mu, sd, s) for s in SEEDS]
            rows.append({"k": int(k), "method": name, "target_class_share": float(is_tgt[idx].mean()),
                         "cifar_share": float((y[idx] < 10).mean()), "acc_mean": float(np.mean(accs)),
                         "acc_std": float(np.std(accs, ddof=1)), "acc": accs,
                         "otm_k": bool(k == est.k), "otm8_k": bool(k == est8.k)})
            log(f"k={k} {name}: target share {rows[-1]['target_class_share']:.3f}, acc {np.mean(accs):.2f}")
    out = {
        "protocol": {"pool": "CIFAR-10 train 50k + Fashion-MNIST train 60k (32x32 RGB)", "target_classes":
                     ["airplane", "automobile", "ship"], "n_target": N_TARGET, "features": f"pixel-PCA {PCA_DIM}",
                     "learner": "MLP 64-256-20, Adam 1e-3, batch 512, 20 epochs", "seeds": list(SEEDS), "eps": 0.05,
                     "pool_target_class_share": float(is_tgt.mean())},
        "otm": {"ratio": est.ratio, "k": est.k, "ratios": est.ratios, "distance": est.distance,
                "seconds": t_est},
        "otm_8d": {"ratio": est8.ratio, "k": est8.k, "ratios": est8.ratios, "distance": est8.distance,
                   "seconds": t_est8},
        "timing": {"ot_scores_s": t_ot, "ot_scores_per_100k_s": t_ot / n * 1e5,
                   "ot_stream_per_100k_s": res.info["seconds"]["stream"] / n * 1e5, "nn_s": t_nn,
                   "features_s": t_feat, "total_s": time.perf_counter() - t_all,
                   "ot_info_seconds": res.info["seconds"]},
        "ot_info": {k: v for k, v in res.info.items() if k != "seconds"},
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": 2},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ot_targeted.json").write_text(json.dumps(out, indent=2))
    write_md(out)
    log(f"done in {out['timing']['total_s']:.0f}s")
    return 0


def write_md(out: dict[str, Any]) -> None:
    p, tm, o, o8 = out["protocol"], out["timing"], out["otm"], out["otm_8d"]
    lines = [
        "# OT targeted selection (TAROT-style) — CIFAR-10 + Fashion-MNIST pool, 3-class CIFAR target",
        "",
        f"Pool: {p['pool']} (target classes = {100 * p['pool_target_class_share']:.1f} % of it). Target: "
        f"{p['n_target']} CIFAR-10 test images of {', '.join(p['target_classes'])}. Features: **{p['features']}** "
        "(pixel PCA; no pretrained encoder here). Learner: "
        f"{p['learner']}, accuracy on the other 2900 test images of the target classes (20-way, chance 5 %), "
        "mean ± std over 3 seeds. Protocol: benchmarks/ot_targeted.py docstring.",
        "",
        "| k kept | method | share from target classes | share CIFAR | target-class test acc % |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in out["rows"]:
        tag = (" (OTM k, 64-d)" if r["otm_k"] else "") + (" (OTM k, 8-d)" if r.get("otm8_k") else "")
        lines.append(f"| {r['k']}{tag} | {r['method']} | {r['target_class_share']:.3f} | {r['cifar_share']:.3f} | "
                     f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} |")
    lines += [
        "",
        f"OTM (TAROT OT-distance minimisation, 5 folds, per-fold scores): estimated ratio **{o['ratio']}** "
        f"(k = {o['k']}; true target-class share {p['pool_target_class_share']:.3f}), {o['seconds']:.1f} s.",
        "",
        "| ratio | " + " | ".join(f"{r:g}" for r in o["ratios"]) + " |",
        "|---|" + "---:|" * len(o["ratios"]),
        "| mean OT distance, 64-d | " + " | ".join(f"{v:.4f}" for v in o["distance"]) + " |",
        "| mean OT distance, 8 leading dims | " + " | ".join(f"{v:.4f}" for v in o8["distance"]) + " |",
        "",
        f"On the 8 leading PCA dims the same estimate gives ratio **{o8['ratio']}** (k = {o8['k']}, {o8['seconds']:.1f} s)."
        " Empirical OT between a selection and a 20-row held-out fold favours concentrated selections in high"
        " dimension, which is why the 64-d estimate is low (see estimate_selection_ratio's docstring).",
        "",
        f"Timing (2 shared CPU cores, no GPU): ot_scores over {110_000:,} rows × 64-d "
        f"{tm['ot_scores_s']:.2f} s = **{tm['ot_scores_per_100k_s']:.2f} s per 100k rows** (of which streaming the "
        f"c-transform {tm['ot_stream_per_100k_s']:.2f} s / 100k; breakdown "
        f"{json.dumps({k: round(v, 2) for k, v in tm['ot_info_seconds'].items()})}); "
        f"whole benchmark {tm['total_s']:.0f} s.",
        "",
    ]
    (RESULTS / "ot_targeted.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
