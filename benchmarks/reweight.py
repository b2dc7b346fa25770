"""Coreset reweighting ("The Power of Few", Jafari et al. ICASSP 2024): full data with propagated weights vs unweighted.

Same data, split, frozen features and learner as benchmarks/prune_then_train.py (its functions are imported, not
copied): a small CNN trained on a 10k reference split, frozen; its 128-d features of the 40k *pool* and of the 10k
test set; the learner is an MLP 128 -> 256 -> 10 on the pool-standardised features (SGD nesterov, one-cycle lr 0.05,
wd 5e-4, batch 128, 15 epochs). Here the learner always trains on the **whole pool**; only the per-sample weights
differ.

Conditions: ``clean`` pool labels, and ``noisy20``: 20 % of the pool labels flipped (seeded), each to a uniformly
drawn *other* class (symmetric noise that always changes the label). Test labels are always clean.

Reweighting stage (timed, per condition; ``scorers.reweight``):

1. coreset: ``scorers.select.select(None, rule="moderate", keep_fraction=--coreset, labels=<pool labels>,
   embeddings=<L2-normalised features>)`` (per-class Moderate, middle band of the distance to the class median);
2. Meta-Weight-Net on the coreset, embedding mode (linear proxy head on the standardised features, 20 % held-out
   meta split chosen as the most class-typical coreset rows, 20 epochs);
3. propagation to the whole pool: 1-NN on the L2-normalised features (``propagate_weights``), then mean 1
   (``normalise_weights``). Variant ``mwn_knn_sc`` (``--variants``): k = 5 inverse-distance, same-class neighbours.

Training uses ``Σ wᵢℓᵢ / Σ wᵢ`` per batch (``pipeline.loader.weighted_loss``'s normalisation). Every (condition,
variant, seed) model of a dataset trains in one batched model; a weighted and an unweighted model of the same seed
share the initialisation and the batch order, so their difference is paired. The reweighting time is compared with
one unweighted MLP trained alone on the full pool (timed separately, same settings).

Usage: ``python benchmarks/reweight.py`` (both datasets; feature CNNs cached by prune_then_train.py, else they are
trained first, ~12 min each); ``--quick`` is a smoke run writing under benchmarks/.cache/quick_results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common_data import CACHE_DIR  # noqa: E402
from benchmarks.prune_then_train import (  # noqa: E402
    DATASETS, FULL, N_CLASSES, QUICK, BatchedMLP, Protocol, log, mean_std, prepare, sgd_onecycle, unit_rows,
)
from scorers.select import select  # noqa: E402
from scorers.reweight import meta_weight_net_weights, normalise_weights, propagate_weights  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
VARIANTS = ("unweighted", "mwn_1nn", "mwn_knn_sc")
NOISE_RATE = 0.2


def flip_labels(y: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric noise: ``rate`` of the rows (exactly round(rate·n)) get a uniformly drawn other class."""
    rng = np.random.default_rng(seed)
    n = y.size
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    out = y.copy()
    out[flipped] = (y[flipped] + rng.integers(1, N_CLASSES, size=int(flipped.sum()))) % N_CLASSES
    return out, flipped


def reweight(unit: np.ndarray, feat_std: np.ndarray, y: np.ndarray, coreset_fraction: float, variant: str,
             mwn_epochs: int, cache: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The timed stage. Coreset + MWN are shared by the variants (cached in ``cache``); propagation is per variant."""
    info: dict[str, Any] = {}
    if "mwn" not in cache:
        t = time.perf_counter()
        sel = select(None, keep_fraction=coreset_fraction, rule="moderate", labels=y, embeddings=unit)
        core = np.flatnonzero(sel.keep)
        t_sel = time.perf_counter() - t
        t = time.perf_counter()
        mwn = meta_weight_net_weights(feat_std, y, core, epochs=mwn_epochs, seed=0)
        cache.update(core=core, mwn=mwn, seconds_coreset=t_sel, seconds_mwn=time.perf_counter() - t)
    core, mwn = cache["core"], cache["mwn"]
    t = time.perf_counter()
    if variant == "mwn_1nn":
        raw = propagate_weights(unit, unit[core], mwn.weights, k=1)
    elif variant == "mwn_knn_sc":
        raw = propagate_weights(unit, unit[core], mwn.weights, k=5, same_class=True, labels=y, coreset_labels=y[core])
    else:
        raise ValueError(f"unknown weighted variant {variant!r}")
    w = normalise_weights(raw)
    t_prop = time.perf_counter() - t
    info["seconds"] = {"coreset": round(cache["seconds_coreset"], 2), "mwn": round(cache["seconds_mwn"], 2),
                       "propagate": round(t_prop, 2),
                       "total": round(cache["seconds_coreset"] + cache["seconds_mwn"] + t_prop, 2)}
    info["coreset_size"] = int(core.size)
    info["mwn"] = mwn.info
    info["weights"] = {"min": round(float(w.min()), 4), "max": round(float(w.max()), 4),
                       "std": round(float(w.std()), 4), "distinct": int(np.unique(w).size)}
    return w, info


def train_weighted_mlps(feat: torch.Tensor, labels: list[np.ndarray], weights: list[np.ndarray], seeds: list[int],
                        test_feat: torch.Tensor, test_y: torch.Tensor, p: Protocol) -> list[float]:
    """One MLP per (labels, weights, seed), all trained together on the full pool; loss Σwℓ/Σw per model and batch.

    With all-ones weights this is exactly prune_then_train's ``train_eval_mlps`` on the full pool."""
    n = feat.shape[0]
    n_models = len(seeds)
    model = BatchedMLP(seeds, feat.shape[1], p.hidden)
    steps_per_epoch = -(-n // p.batch_size)
    opt, sched = sgd_onecycle(model.parameters(), p.lr, p.weight_decay, p.epochs * steps_per_epoch)
    y = torch.as_tensor(np.stack(labels), dtype=torch.long)  # [M, n]
    w = torch.as_tensor(np.stack(weights), dtype=torch.float32)  # [M, n]
    gens = [torch.Generator().manual_seed(10_000 + int(s)) for s in seeds]
    rows = torch.arange(n_models).unsqueeze(1)
    for _ in range(p.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for b in range(0, n, p.batch_size):
            ids = order[:, b:b + p.batch_size]
            logits = model(feat[ids])
            loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), y[rows, ids].reshape(-1),
                                   reduction="none").view(n_models, -1)
            wb = w[rows, ids]
            # Sum over models of each model's Σwℓ/Σw: the models' gradients stay independent.
            total = ((wb * loss).sum(1) / wb.sum(1).clamp_min(1e-12)).sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        pred = model(test_feat.unsqueeze(0).expand(n_models, -1, -1)).argmax(-1)
    return [round(100.0 * float(v), 3) for v in (pred == test_y.unsqueeze(0)).float().mean(1)]


def run_dataset(name: str, p: Protocol, seeds: list[int], variants: list[str], coreset_fraction: float,
                mwn_epochs: int, time_single: bool) -> dict[str, Any]:
    t_all = time.perf_counter()
    data = prepare(name, p)
    mu, sd = data["feat_pool"].mean(0), data["feat_pool"].std(0) + 1e-6
    feat_std = ((data["feat_pool"] - mu) / sd).astype(np.float32)
    test_std = torch.from_numpy(((data["feat_test"] - mu) / sd).astype(np.float32))
    unit = unit_rows(data["feat_pool"])
    y_clean, y_test = data["y_pool"], data["y_test"]
    y_noisy, flipped = flip_labels(y_clean, NOISE_RATE, seed=12345)
    conditions = {"clean": (y_clean, np.zeros_like(flipped)), "noisy20": (y_noisy, flipped)}

    jobs: list[tuple[str, str, int, np.ndarray, np.ndarray]] = []
    stage: dict[str, Any] = {}
    for cond, (y, flip) in conditions.items():
        cache: dict[str, Any] = {}
        for variant in variants:
            if variant == "unweighted":
                w = np.ones(y.size)
            else:
                w, info = reweight(unit, feat_std, y, coreset_fraction, variant, mwn_epochs, cache)
                if flip.any():
                    core = cache["core"]
                    info["noise"] = {
                        "coreset_flipped_share": round(float(flip[core].mean()), 4),
                        "pool_flipped_share": round(float(flip.mean()), 4),
                        "mwn_weight_mean_flipped": round(float(cache["mwn"].weights[flip[core]].mean()), 4)
                        if flip[core].any() else None,
                        "mwn_weight_mean_clean": round(float(cache["mwn"].weights[~flip[core]].mean()), 4),
                        "pool_weight_mean_flipped": round(float(w[flip].mean()), 4),
                        "pool_weight_mean_clean": round(float(w[~flip].mean()), 4),
                    }
                stage[f"{cond}/{variant}"] = info
                log(f"{name} {cond} {variant}: reweighting {info['seconds']['total']:.1f}s {info.get('noise', '')}")
            jobs += [(cond, variant, s, y, w) for s in seeds]

    t = time.perf_counter()
    feat_t, ytest_t = torch.from_numpy(feat_std), torch.from_numpy(y_test)
    accs = train_weighted_mlps(feat_t, [j[3] for j in jobs], [j[4] for j in jobs], [j[2] for j in jobs], test_std,
                               ytest_t, p)
    train_seconds = time.perf_counter() - t
    log(f"{name}: trained {len(jobs)} models on the full pool in {train_seconds:.0f}s (batched)")
    acc: dict[str, dict[str, list[float]]] = {}
    for (cond, variant, _, _, _), a in zip(jobs, accs):
        acc.setdefault(cond, {}).setdefault(variant, []).append(a)

    single = None
    if time_single:
        t = time.perf_counter()
        train_weighted_mlps(feat_t, [y_clean], [np.ones(y_clean.size)], [seeds[0]], test_std, ytest_t, p)
        single = round(time.perf_counter() - t, 1)
        log(f"{name}: one unweighted MLP alone on the full pool: {single}s")
    return {
        "dataset": name, "protocol": asdict(p), "seeds": seeds, "variants": variants,
        "coreset_fraction": coreset_fraction, "mwn_epochs": mwn_epochs, "noise_rate": NOISE_RATE,
        "pool_size": int(y_clean.size), "test_size": int(y_test.size),
        "feature_cnn_test_accuracy": round(data["ref_test_acc"], 3),
        "accuracy": acc, "reweighting": stage,
        "seconds": {"total": round(time.perf_counter() - t_all, 1), "training_batched": round(train_seconds, 1),
                    "n_models_batched": len(jobs), "single_unweighted_training": single},
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "machine": platform.machine(), "cpus": os.cpu_count()},
    }


def write_markdown(results: list[dict[str, Any]], path: Path) -> None:
    r0 = results[0]
    p0 = r0["protocol"]
    doc = [
        "# Coreset reweighting: full data, propagated weights vs unweighted (benchmarks/reweight.py)",
        "",
        "Test accuracy (%) of an MLP 128→256→10 trained on the **whole pool** of frozen SmallCNN features (the "
        "prune_then_train.py protocol: CNN trained on a 10k reference split, pool = the rest, never seen by the CNN), "
        f"{p0['epochs']} epochs, SGD + one-cycle lr; mean ± std (ddof 1) over seeds {r0['seeds']}. "
        f"`noisy20`: {100 * r0['noise_rate']:g}% of the pool labels flipped to a uniformly drawn other class (test "
        "labels clean). Weighted rows use loss Σwℓ/Σw per batch; weights from a per-class Moderate coreset of "
        f"{100 * r0['coreset_fraction']:g}% of the pool → Meta-Weight-Net ({r0['mwn_epochs']} epochs, linear proxy head "
        "on the standardised features, 20% most class-typical coreset rows held out as the meta set) → nearest "
        "coreset row on the L2-normalised features (`mwn_1nn`) or 5-NN inverse-distance among same-label coreset rows "
        "(`mwn_knn_sc`), mean 1. Weighted and unweighted models of one seed share init and batch order: Δ is paired.",
        "",
        "| dataset | labels | variant | test acc (%) | Δ vs unweighted (pp, paired mean ± std) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for cond, per in r["accuracy"].items():
            base = np.asarray(per["unweighted"])
            for variant, vals in per.items():
                m, s = mean_std(vals)
                if variant == "unweighted":
                    delta = "—"
                else:
                    dm, ds = mean_std(list(np.asarray(vals) - base))
                    delta = f"{dm:+.2f} ± {ds:.2f}"
                doc.append(f"| {r['dataset']} | {cond} | {variant} | {m:.2f} ± {s:.2f} | {delta} |")
    doc += ["", "Reweighting stage (coreset + MWN + propagation, one process, 2 shared CPU cores) vs training:", "",
            "| dataset | labels | variant | coreset s | MWN s | propagate s | total s | one MLP on full pool s | "
            "coreset flipped | MWN w flipped / clean | pool w flipped / clean |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        single = r["seconds"]["single_unweighted_training"]
        for key, info in r["reweighting"].items():
            cond, variant = key.split("/")
            s = info["seconds"]
            nz = info.get("noise")
            doc.append(
                f"| {r['dataset']} | {cond} | {variant} | {s['coreset']:.2f} | {s['mwn']:.2f} | {s['propagate']:.2f} | "
                f"{s['total']:.2f} | {single if single is not None else '—'} | "
                + (f"{100 * nz['coreset_flipped_share']:.1f}% (pool {100 * nz['pool_flipped_share']:.0f}%) | "
                   f"{nz['mwn_weight_mean_flipped']} / {nz['mwn_weight_mean_clean']} | "
                   f"{nz['pool_weight_mean_flipped']} / {nz['pool_weight_mean_clean']} |" if nz else "— | — | — |"))
    doc += ["", "MWN and the coreset are computed once per condition and shared by the two variants (their time is "
            "counted in each row). \"coreset flipped\" = share of flipped labels inside the Moderate coreset; "
            "\"w flipped / clean\" = mean weight of flipped vs clean samples (MWN: raw sigmoid weights on the coreset; "
            "pool: propagated, mean 1). The first MWN call of a process also pays torch.func's lazy imports "
            "(about 10 s here; the clean rows run first). The machine's 2 cores were shared with other jobs (load "
            "average ≈ 7), which inflates every time in the table; in the committed cifar10 run the noisy20 MWN stage "
            "(51 s vs 21 s clean, same sizes) and the batched training also overlapped with our own test and "
            "scale-check runs.", ""]
    for r in results:
        sec = r["seconds"]
        doc.append(f"- {r['dataset']}: pool {r['pool_size']}, test {r['test_size']}, feature CNN test acc "
                   f"{r['feature_cnn_test_accuracy']:.2f}%; {sec['n_models_batched']} models trained batched in "
                   f"{sec['training_batched']:.0f} s; wall {sec['total']:.0f} s; one unweighted MLP alone on the full "
                   f"pool {sec['single_unweighted_training']} s"
                   + (f" (re-measured with --time-only; the in-run measurement, {sec['single_unweighted_training_first']}"
                      " s, shared the cores with another job of ours)" if "single_unweighted_training_first" in sec
                      else "") + ".")
    doc.append("")
    path.write_text("\n".join(doc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", default="unweighted,mwn_1nn", help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--coreset", type=float, default=0.05, help="coreset size as a fraction of the pool")
    ap.add_argument("--mwn-epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-single-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="rewrite reweight.md from reweight.json")
    ap.add_argument("--time-only", action="store_true",
                    help="re-measure the single-model full-pool training time into reweight.json, rewrite the .md")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "unweighted" not in variants:
        variants.insert(0, "unweighted")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    torch.set_num_threads(args.threads)
    out = args.out or (CACHE_DIR / "quick_results" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    names = DATASETS if args.dataset == "both" else (args.dataset,)
    results_path = out / "reweight.json"
    existing = json.loads(results_path.read_text()) if results_path.exists() else []
    results = {r["dataset"]: r for r in existing}
    if args.time_only:  # re-measure the single-model reference (e.g. after a run that shared the cores)
        for name in names:
            p = (QUICK if args.quick else FULL)[name]
            data = prepare(name, p)
            mu, sd = data["feat_pool"].mean(0), data["feat_pool"].std(0) + 1e-6
            t = time.perf_counter()
            train_weighted_mlps(torch.from_numpy(((data["feat_pool"] - mu) / sd).astype(np.float32)),
                                [data["y_pool"]], [np.ones(data["y_pool"].size)], [0],
                                torch.from_numpy(((data["feat_test"] - mu) / sd).astype(np.float32)),
                                torch.from_numpy(data["y_test"]), p)
            sec = results[name]["seconds"]
            sec.setdefault("single_unweighted_training_first", sec["single_unweighted_training"])
            sec["single_unweighted_training"] = round(time.perf_counter() - t, 1)
            log(f"{name}: one unweighted MLP alone on the full pool: {sec['single_unweighted_training']}s "
                f"(first measurement {sec['single_unweighted_training_first']}s)")
        results_path.write_text(json.dumps([results[n] for n in DATASETS if n in results], indent=1))
        args.report_only = True
    if args.report_only:
        write_markdown([results[n] for n in DATASETS if n in results], out / "reweight.md")
        return 0
    for name in names:
        p = (QUICK if args.quick else FULL)[name]
        if args.quick:
            p = replace(p, epochs=3)
        results[name] = run_dataset(name, p, list(range(args.seeds)), variants, args.coreset,
                                    3 if args.quick else args.mwn_epochs, not args.no_single_timing)
        ordered = [results[n] for n in DATASETS if n in results]
        results_path.write_text(json.dumps(ordered, indent=1))
        write_markdown(ordered, out / "reweight.md")
        log(f"wrote {results_path} and reweight.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
