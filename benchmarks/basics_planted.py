"""Planted problems in the shared CIFAR-10 images: precision/recall of winnow's basic checks (#17) and their cost.

Plants, each on its own rows of a class-balanced CIFAR-10 training pool (JPEG bytes, decoded as the pipeline does):
- blurred (Gaussian blur, radius 1.2), darkened (pixel values × 0.12), tiny (shrunk to 12 × 12 px),
- duplicated-into-test: test images copied into the pool, re-encoded at JPEG quality 90 (near copies) and as the
  test file's own bytes (exact copies),
- off-domain: Fashion-MNIST images (grey, upscaled to 32 px) with a random CIFAR label,
- flipped labels: 10% of the clean pool rows get another class.
Scorers: quality (scorers.quality.image_stats + quality_issues, defaults), outlier (k = 10), leak (eps grid), label_issues
(cleanlab on out-of-fold probs) against AUM (same proxy heads; bottom-|flipped| by AUM), on the features of a small CNN
trained here on a disjoint reference split (no pretrained CLIP can be downloaded); label issues also on Fashion-MNIST
pixels (unit-normalised), where the probe is better. Costs are wall times on this shared 2-core machine, scaled to 100k rows.

Outlier: k-th NN distance and density ratio with neighbours among the pool's own rows, and against the test split as
the step's in-domain `target` (reference mode), on the off-domain group alone and with isolated noise images added.

Usage: nice -n 10 python benchmarks/basics_planted.py [--pool 5000] [--write-folder DIR] [--cleanvision-json F]
       nice -n 10 python benchmarks/basics_planted.py --pool 4000 --per-plant 80 --only-outlier --epochs 15
       (→ basics_outlier_planted.json)
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common_data import DATA_DIR, load_cifar10, load_fmnist  # noqa: E402
from benchmarks.prune_then_train import balanced_split, channel_stats, cnn_apply, to_float, train_cnn  # noqa: E402
from scorers.head import head_scores  # noqa: E402
from scorers.label_issues import label_issues_from_probs  # noqa: E402
from scorers.leak import find_leaks  # noqa: E402
from scorers.outlier import outlier_scores  # noqa: E402
from scorers.quality import STAT_COLUMNS, image_stats, quality_issues  # noqa: E402

REF_SIZE = 4000  # reference split that trains the feature CNN (disjoint from the pool)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def jpeg(arr: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def pr(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((found & truth).sum())
    return {"precision": round(tp / max(int(found.sum()), 1), 3), "recall": round(tp / max(int(truth.sum()), 1), 3),
            "flagged": int(found.sum()), "planted": int(truth.sum())}


def build(pool_n: int, per_plant: int, seed: int) -> dict[str, Any]:
    d = load_cifar10()
    fm = load_fmnist()
    rng = np.random.default_rng(seed)
    ref_idx, rest = balanced_split(d["y_train"], REF_SIZE, rng)
    pool_idx = rest[balanced_split(d["y_train"][rest], pool_n, rng)[0]]
    test_idx = balanced_split(d["y_test"], 1000, rng)[0]
    with np.load(DATA_DIR / "cifar10_jpeg_bytes.npz") as z:
        blob_tr, off_tr = z["jpeg_train"].tobytes(), z["offsets_train"]
        blob_te, off_te = z["jpeg_test"].tobytes(), z["offsets_test"]
    test_bytes = [blob_te[off_te[i]:off_te[i + 1]] for i in test_idx]
    data: list[bytes] = [blob_tr[off_tr[i]:off_tr[i + 1]] for i in pool_idx]
    labels = d["y_train"][pool_idx].copy()
    kind = np.array(["clean"] * pool_n, dtype=object)
    chosen = rng.permutation(pool_n)
    groups = {name: chosen[i * per_plant:(i + 1) * per_plant] for i, name in enumerate(("blurred", "darkened", "tiny"))}
    for name, rows in groups.items():
        for r in rows:
            arr = np.asarray(decode(data[r]))
            if name == "blurred":
                arr = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.2)))
            elif name == "darkened":
                arr = (arr.astype(np.float32) * 0.12).astype(np.uint8)
            else:
                arr = np.asarray(Image.fromarray(arr).resize((12, 12), Image.Resampling.BILINEAR))
            data[r] = jpeg(arr)
            kind[r] = name
    # appended rows: near and exact copies of test images, off-domain images
    leak_src = rng.choice(len(test_idx), per_plant, replace=False)
    leak_of = np.full(pool_n, -1, dtype=np.int64)
    extra_kind, extra_labels, extra_leak = [], [], []
    for j, t in enumerate(leak_src):
        exact = j < per_plant // 5
        data.append(test_bytes[t] if exact else jpeg(np.asarray(decode(test_bytes[t])), quality=90))
        extra_kind.append("leak_exact" if exact else "leak_near")
        extra_labels.append(int(d["y_test"][test_idx[t]]))
        extra_leak.append(int(t))
    off = rng.choice(len(fm["y_train"]), per_plant, replace=False)
    for i in off:
        grey = Image.fromarray(fm["x_train"][i]).resize((32, 32), Image.Resampling.BILINEAR).convert("RGB")
        data.append(jpeg(np.asarray(grey)))
        extra_kind.append("off_domain")
        extra_labels.append(int(rng.integers(0, 10)))
        extra_leak.append(-1)
    kind = np.concatenate([kind, np.array(extra_kind, dtype=object)])
    labels = np.concatenate([labels, np.array(extra_labels)])
    leak_of = np.concatenate([leak_of, np.array(extra_leak)])
    true_labels = labels.copy()
    clean = np.flatnonzero(kind == "clean")
    flipped = rng.choice(clean, len(clean) // 10, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    is_flipped = np.zeros(len(labels), bool)
    is_flipped[flipped] = True
    return {"data": data, "labels": labels, "true_labels": true_labels, "kind": kind, "leak_of": leak_of,
            "flipped": is_flipped, "test_bytes": test_bytes, "test_labels": d["y_test"][test_idx],
            "x_ref": np.asarray(d["x_train"][ref_idx]), "y_ref": d["y_train"][ref_idx]}


def write_folder(planted: dict[str, Any], root: Path) -> None:
    """The planted pool as an image folder (train/<class>/...) and the test split beside it (test/<class>/...)."""
    for i, (b, y, k) in enumerate(zip(planted["data"], planted["labels"], planted["kind"])):
        path = root / "train" / CLASSES[y] / f"{i:06d}_{k}{'_flipped' if planted['flipped'][i] else ''}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b)
    for j, (b, y) in enumerate(zip(planted["test_bytes"], planted["test_labels"])):
        path = root / "test" / CLASSES[y] / f"t{j:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--per-plant", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-folder", type=Path)
    ap.add_argument("--cleanvision-json", type=Path, help="flags written by benchmarks/cleanvision_flags.py on --write-folder")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only-outlier", action="store_true", help="build, train the feature CNN, measure outlier only")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the feature CNN (better features separate domains better)")
    ap.add_argument("--noise-rows", type=int, default=20, help="isolated noise images added for the outlier measurement")
    args = ap.parse_args()
    results_dir = Path(__file__).resolve().parent / "results"
    args.out = args.out or results_dir / ("basics_outlier_planted.json" if args.only_outlier else "basics_planted.json")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    planted = build(args.pool, args.per_plant, args.seed)
    n = len(planted["data"])
    kind = planted["kind"]
    print(f"built {n} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.write_folder:
        write_folder(planted, args.write_folder)
    results: dict[str, Any] = {"rows": n, "per_plant": args.per_plant, "seed": args.seed, "threads": args.threads,
                               "machine": "shared 2-core VM, other jobs running: absolute times inflated"}
    cost: dict[str, float] = {}

    images = [decode(b) for b in planted["data"]]
    if not args.only_outlier:
        quality_section(results, cost, planted, images, args)
    # features of a small CNN trained on a disjoint reference split
    t = time.perf_counter()
    x_ref = planted["x_ref"]
    mean, std = channel_stats(x_ref)
    cnn = train_cnn(to_float(x_ref, mean, std), torch.from_numpy(planted["y_ref"]), in_ch=3, widths=(32, 64, 128), epochs=args.epochs,
                    lr=0.1, wd=5e-4, batch_size=128, seed=0, flip=True)
    pool_u8 = np.stack([np.asarray(im.resize((32, 32), Image.Resampling.BILINEAR)) for im in images])
    test_u8 = np.stack([np.asarray(decode(b)) for b in planted["test_bytes"]])
    feat = cnn_apply(cnn, pool_u8, mean, std, what="features")
    feat_test = cnn_apply(cnn, test_u8, mean, std, what="features")
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    feat_test /= np.linalg.norm(feat_test, axis=1, keepdims=True)
    acc = float((cnn.head(torch.from_numpy(cnn_apply(cnn, test_u8, mean, std, what="features"))).argmax(1).numpy()
                 == planted["test_labels"]).mean())
    results["features"] = {"model": f"SmallCNN (32-64-128) trained {args.epochs} epochs on {REF_SIZE} disjoint CIFAR-10 train images",
                           "test_accuracy": round(acc, 3), "seconds": round(time.perf_counter() - t, 1), "dim": int(feat.shape[1])}
    print(f"features done ({acc:.3f} test acc)", flush=True)

    # outlier: off-domain rows, neighbours among the pool's own rows, then among an in-domain target (the test split)
    t = time.perf_counter()
    out = outlier_scores(feat, k=10)
    cost["outlier_flat_per_100k_s_at_this_n"] = (time.perf_counter() - t) / n * 1e5
    t = time.perf_counter()
    outlier_scores(feat, k=10, reference=feat_test)
    cost["outlier_vs_1k_target_flat_per_100k_s"] = (time.perf_counter() - t) / n * 1e5
    results["outlier"] = outlier_section(feat, feat_test, kind, noise_features(cnn, mean, std, args.noise_rows, args.seed))
    if args.only_outlier:
        results["cost"] = {k: round(v, 3) for k, v in cost.items()}
        results["seconds_total"] = round(time.perf_counter() - t0, 1)
        write(results, args.out)
        return

    # leak: copies of test images
    leak_truth = planted["leak_of"] >= 0
    test_hashes = np.array([__import__("hashlib").sha1(b).hexdigest() for b in planted["test_bytes"]], dtype=object)
    pool_hashes = np.array([__import__("hashlib").sha1(b).hexdigest() for b in planted["data"]], dtype=object)
    for eps in (0.005, 0.01, 0.02, 0.05):
        t = time.perf_counter()
        lk = find_leaks(feat, feat_test, eps=eps, train_hashes=pool_hashes, eval_hashes=test_hashes)
        secs = time.perf_counter() - t
        found = lk.match >= 0
        r = pr(found, leak_truth)
        r["right_eval_row"] = round(float((lk.match[leak_truth] == planted["leak_of"][leak_truth]).mean()), 3)
        r["exact_by_hash"] = int(lk.exact.sum())
        results.setdefault("leak", {})[f"eps={eps}"] = r
        cost[f"leak_eps{eps}_per_100k_train_vs_1k_eval_s"] = secs / n * 1e5

    print(f"outlier/leak done: {results['outlier']} {results['leak']}", flush=True)
    # label issues vs AUM on the CNN features (clean + flipped rows only: planted image problems are not label noise)
    from scorers.el2n import el2n_embedding_scores

    t = time.perf_counter()
    fit = el2n_embedding_scores(feat, planted["labels"], n_seeds=3, n_folds=5, epochs=10, score_epoch=10, return_aum=True,
                                return_probs=True, seed=0)
    li = label_issues_from_probs(planted["labels"], fit.probs)
    cost["label_issues_proxy_heads_plus_cleanlab_per_100k_s"] = (time.perf_counter() - t) / n * 1e5
    flipped = planted["flipped"]
    results["label_issues_cifar_cnn_features"] = label_table(li, fit.aum, flipped, planted["true_labels"], fit.info)

    # Fashion-MNIST pixels: 10k rows, 10% flipped
    fm = load_fmnist()
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(fm["y_train"]), 10_000, replace=False)
    x = fm["x_train"][idx].reshape(len(idx), -1).astype(np.float32)
    x -= x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y_true = fm["y_train"][idx]
    y = y_true.copy()
    fl = rng.choice(len(y), len(y) // 10, replace=False)
    y[fl] = (y[fl] + rng.integers(1, 10, len(fl))) % 10
    fl_mask = np.zeros(len(y), bool)
    fl_mask[fl] = True
    fit = el2n_embedding_scores(x, y, n_seeds=3, n_folds=5, epochs=10, score_epoch=10, return_aum=True, return_probs=True, seed=0)
    li = label_issues_from_probs(y, fit.probs)
    results["label_issues_fmnist_pixels"] = label_table(li, fit.aum, fl_mask, y_true, fit.info)

    # head: LAION aesthetic MLP shape (random weights) on 768-d rows: cost only
    g = np.random.default_rng(0)
    dims = [768, 1024, 128, 64, 16, 1]
    layers = [(g.standard_normal((o, i)).astype(np.float32) / np.sqrt(i), np.zeros(o, np.float32)) for i, o in zip(dims, dims[1:])]
    e768 = g.standard_normal((20_000, 768)).astype(np.float32)
    t = time.perf_counter()
    head_scores(e768, layers)
    cost["head_laion_aesthetic_mlp_768d_per_100k_s"] = (time.perf_counter() - t) / 20_000 * 1e5
    results["cost"] = {k: round(v, 3) for k, v in cost.items()}
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    write(results, args.out)


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps(results, indent=1, default=float))


def noise_features(cnn: Any, mean: Any, std: Any, rows: int, seed: int) -> np.ndarray:
    """CNN features of isolated junk: each a different coarse colour-noise image (4 × 4 blocks upscaled to 32 px, JPEG)."""
    rng = np.random.default_rng(seed + 1)
    imgs = [np.asarray(decode(jpeg(np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                                              .resize((32, 32), Image.Resampling.NEAREST))))) for _ in range(rows)]
    f = cnn_apply(cnn, np.stack(imgs), mean, std, what="features")
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def outlier_section(feat: np.ndarray, feat_test: np.ndarray, kind: np.ndarray, noise: np.ndarray) -> dict[str, Any]:
    """Precision/recall of the top-m rows by each outlier score: the planted off-domain group alone, then with isolated
    noise rows added to the pool (the case pool-only kNN scores were made for), neighbours in the pool or in the test
    split (1000 in-domain rows, the `target` of the step)."""
    res: dict[str, Any] = {}
    group = kind == "off_domain"
    m = int(group.sum())

    def top(score: np.ndarray, count: int) -> np.ndarray:
        mask = np.zeros(len(score), bool)
        mask[np.argsort(-score, kind="stable")[:count]] = True
        return mask

    # "after quality": the planted blurred / darkened / tiny rows removed, as when `quality` runs first (the darkened
    # rows are an off-domain group of their own against the test split and would otherwise fill the top)
    after_quality = ~np.isin(kind, ["blurred", "darkened", "tiny"])
    for rows_name, rows in (("all rows", np.ones(len(kind), bool)), ("after quality", after_quality)):
        for k in (10, 50):
            for where, ref in (("pool", None), ("target=test split", feat_test)):
                out = outlier_scores(feat[rows], k=k, reference=ref)
                for name in ("kth_distance", "density_ratio"):
                    score = getattr(out, name)
                    for count in (m, 2 * m):
                        key = f"{rows_name}: off_domain group ({m})@top{count} by {name}, k={k}, neighbours in {where}"
                        res[key] = pr(top(score, count), group[rows])
                        if count == 2 * m:
                            flagged = kind[rows][top(score, count)]
                            res[key]["top_by_kind"] = {str(c): int((flagged == c).sum()) for c in np.unique(flagged)}
    # isolated rows added: both kinds planted
    both = np.concatenate([feat[after_quality], noise])
    is_noise = np.concatenate([np.zeros(int(after_quality.sum()), bool), np.ones(len(noise), bool)])
    truth = np.concatenate([group[after_quality], np.zeros(len(noise), bool)]) | is_noise
    for where, ref in (("pool", None), ("target=test split", feat_test)):
        out = outlier_scores(both, k=10, reference=ref)
        for name in ("kth_distance", "density_ratio"):
            score = getattr(out, name)
            found = top(score, int(truth.sum()))
            key = f"after quality: group ({m}) + isolated noise ({len(noise)})@top{int(truth.sum())} by {name}, k=10, neighbours in {where}"
            res[key] = pr(found, truth) | {"isolated_recall": pr(found, is_noise)["recall"],
                                           "isolated_recall@top" + str(len(noise)): pr(top(score, len(noise)), is_noise)["recall"]}
    return res


def quality_section(results: dict[str, Any], cost: dict[str, float], planted: dict[str, Any], images: list[Image.Image],
                    args: argparse.Namespace) -> None:
    """quality: the statistics the decode path computes, on the decoded JPEGs."""
    n, kind = len(images), planted["kind"]
    t = time.perf_counter()
    rows = [image_stats(im, n_bytes=len(b)) for im, b in zip(images, planted["data"])]
    cost["quality_stats_per_100k_s"] = (time.perf_counter() - t) / n * 1e5
    stats = {c: np.array([r[c] for r in rows]) for c in STAT_COLUMNS}
    stats["width"] = np.array([im.size[0] for im in images])
    stats["height"] = np.array([im.size[1] for im in images])
    t = time.perf_counter()
    q = quality_issues(stats)
    cost["quality_checks_per_100k_s"] = (time.perf_counter() - t) / n * 1e5
    results["quality"] = {
        "thresholds": q.thresholds,
        "blurred→blurry": pr(q.failed["blurry"], kind == "blurred"),
        "darkened→dark": pr(q.failed["dark"], kind == "darkened"),
        "tiny→tiny": pr(q.failed["tiny"], kind == "tiny"),
        "any_check_on_clean_rows": round(float(np.mean([q.issue[i] is not None for i in np.flatnonzero(kind == "clean")])), 4),
        "flags_by_check": {c: int(m.sum()) for c, m in q.failed.items()},
    }
    for c in ("blurry", "dark", "low_contrast", "low_information"):
        results["quality"].setdefault("flags_by_planted_kind", {})[c] = {
            k: int(q.failed[c][kind == k].sum()) for k in np.unique(kind)}
    if args.cleanvision_json and args.cleanvision_json.exists():
        cv = json.loads(args.cleanvision_json.read_text())
        index = {Path(p).name.split("_")[0]: v for p, v in cv["flags"].items()}
        order = [f"{i:06d}" for i in range(n)]
        agree: dict[str, Any] = {"cleanvision": cv["version"], "seconds": cv.get("seconds")}
        for ours, theirs, planted_kind in (("blurry", "is_blurry_issue", "blurred"), ("dark", "is_dark_issue", "darkened")):
            cvf = np.array([bool(index[o][theirs]) for o in order])
            w = q.failed[ours]
            agree[ours] = {"both": int((w & cvf).sum()), "winnow_only": int((w & ~cvf).sum()),
                           "cleanvision_only": int((~w & cvf).sum()), "neither": int((~w & ~cvf).sum()),
                           "cleanvision_vs_planted": pr(cvf, kind == planted_kind)}
        results["quality"]["cleanvision_agreement"] = agree

    print(f"quality done: {results['quality']}", flush=True)


def label_table(li: Any, aum: np.ndarray, flipped: np.ndarray, true_labels: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    m = int(flipped.sum())
    by_aum = np.zeros(len(aum), bool)
    by_aum[np.argsort(aum)[:m]] = True
    by_quality = np.zeros(len(aum), bool)
    by_quality[np.argsort(li.label_quality)[:m]] = True
    caught = flipped & li.is_issue
    return {
        "cleanlab_find_label_issues": pr(li.is_issue, flipped),
        f"cleanlab_label_quality_bottom{m}": pr(by_quality, flipped),
        f"aum_bottom{m}": pr(by_aum, flipped),
        "suggested_label_right_on_caught_flips": round(float((li.suggested[caught] == true_labels[caught]).mean()), 3) if caught.any() else None,
        "oof_accuracy_vs_given": round(float(li.info["oof_accuracy"]), 3),
        "proxy": {k: info[k] for k in ("head", "n_seeds", "n_folds", "epochs")},
    }


if __name__ == "__main__":
    main()
