"""Dataset distillation benchmark: DM, DM+flip (FYI), NCFM-style CF matching vs random real subsets of equal size.

Reduced CPU protocol (the published one in brackets; DM/DSA evaluate_synset and main_DM defaults):
  ConvNet-3 of width --width (128), instance norm, avg pooling, for distillation and for evaluation;
  --iterations distillation iterations (20,000) with --batch-real real images per class (256);
  real pool of --per-class images per class (all 5,000 / 6,000); test on the first --test-limit test images (10,000);
  evaluation: ConvNet trained --epochs epochs (1,000) with DSA, SGD lr 0.01 mom 0.9 wd 5e-4, lr x0.1 at half;
  --n-sets synthetic sets x --n-nets networks (5 x 20). NCFM: t ~ N(0, I), --num-freqs frequencies (4,096),
  alpha = beta = 0.5, loss x300, Adam on the images, random (not pre-trained) ConvNets, no sampling net, no calibration,
  no multi-formation.

Each dataset runs in its own process (``--datasets fmnist`` / ``--datasets cifar10``) and writes a partial JSON under
benchmarks/.cache; ``--merge`` writes benchmarks/results/distill.{json,md} from the partials.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import distill as dd  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
DATA_DIR = Path(os.environ.get("WINNOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
NAMES = {"fmnist": "fashion_mnist", "cifar10": "cifar10"}
PUBLISHED = "CIFAR-10 IPC 10, ConvNet-3, full protocol: random real 26.0, DM 48.9, NCFM ~71.8"


def run_dataset(ds: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    data = dd.load_npz(NAMES[ds], DATA_DIR, per_class=args.per_class, test_limit=args.test_limit, seed=0)
    mean, std = data.mean_std()
    print(f"[{ds}] loaded pool {len(data.y_train)} test {len(data.y_test)} in {time.perf_counter() - t0:.1f}s", flush=True)
    part_path = CACHE / f"distill_{ds}.json"
    rows: list[dict] = []
    epochs_for = dict(zip(args.ipc, _epochs_list(args)))
    for ipc in args.ipc:
        epochs = epochs_for[ipc]
        for method in args.methods:
            t_method = time.perf_counter()
            accs, distill_s, eval_s, first_last = [], [], [], []
            for k in range(args.n_sets):
                seed = 1000 * ipc + k
                t = time.perf_counter()
                if method == "random":
                    syn = dd.random_real_subset(data, ipc=ipc, seed=seed)
                else:
                    base = "ncfm" if method == "ncfm" else "dm"
                    syn = dd.distill_pixels(
                        data, method=base, flip=(method == "dm_flip"), ipc=ipc, iterations=args.iterations,
                        batch_real=args.batch_real, width=args.width, depth=args.depth,
                        optimizer="adam" if base == "ncfm" else "sgd",
                        lr_img=args.ncfm_lr if base == "ncfm" else args.dm_lr, num_freqs=args.num_freqs, seed=seed)
                    first_last.append([syn.losses[0], syn.losses[-1]])
                distill_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                for j in range(args.n_nets):
                    accs.append(dd.train_and_test(syn.x, syn.y, data.x_test, data.y_test, n_classes=data.n_classes,
                                                  mean=mean, std=std, width=args.width, depth=args.depth,
                                                  epochs=epochs, seed=7919 * (k + 1) + j))
                eval_s.append(time.perf_counter() - t)
                print(f"[{ds}] ipc {ipc} {method} set {k}: distill {distill_s[-1]:.1f}s eval {eval_s[-1]:.1f}s "
                      f"accs {accs[-args.n_nets:]}", flush=True)
            a = np.asarray(accs) * 100
            rows.append({"dataset": ds, "ipc": ipc, "method": method, "eval_epochs": epochs,
                         "acc_mean": float(a.mean()), "acc_std": float(a.std()),
                         "n_runs": len(a), "accs": a.tolist(), "distill_s_per_set": float(np.mean(distill_s)),
                         "eval_s_per_set": float(np.mean(eval_s)), "wall_s": time.perf_counter() - t_method,
                         "loss_first_last": first_last})
            CACHE.mkdir(parents=True, exist_ok=True)
            part_path.write_text(json.dumps({"dataset": ds, "rows": rows, "protocol": protocol(args)}, indent=2))
    return {"dataset": ds, "rows": rows}


def _epochs_list(args: argparse.Namespace) -> list[int]:
    return args.epochs if len(args.epochs) == len(args.ipc) else args.epochs[:1] * len(args.ipc)


def protocol(args: argparse.Namespace) -> dict:
    return {"width": args.width, "depth": args.depth, "iterations": args.iterations, "batch_real": args.batch_real,
            "per_class_pool": args.per_class, "test_limit": args.test_limit,
            "eval_epochs": dict(zip(map(str, args.ipc), _epochs_list(args))),
            "n_sets": args.n_sets, "n_nets": args.n_nets, "num_freqs": args.num_freqs, "dm_lr_img": args.dm_lr,
            "ncfm_lr_img": args.ncfm_lr, "threads": torch.get_num_threads(), "dsa": True,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs", "torch": torch.__version__,
            "published_for_scale": PUBLISHED}


def merge(command: str, note: str = "") -> None:
    parts = [json.loads(p.read_text()) for p in sorted(CACHE.glob("distill_*.json"))]
    rows = [r for p in parts for r in p["rows"]]
    out = {"protocol": parts[0]["protocol"] if parts else {}, "rows": rows, "command": command, "note": note}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(out, indent=2))
    label = {"random": "random real", "dm": "DM", "dm_flip": "DM + flip (FYI)", "ncfm": "CF matching (NCFM-style)"}
    lines = ["| dataset | IPC | method | test acc % (mean ± std) | runs | distill s / set | eval s / set | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['ipc']} | {label.get(r['method'], r['method'])} | "
                     f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['n_runs']} | {r['distill_s_per_set']:.0f} | "
                     f"{r['eval_s_per_set']:.0f} | {r['wall_s']:.0f} |")
    p = out["protocol"]
    md = [
        "# Dataset distillation benchmark (`benchmarks/distill.py`)",
        "",
        f"Command: `{command}`",
        "",
        *lines,
        "",
        f"Protocol (reduced, CPU): ConvNet-3 width {p.get('width')}, {p.get('iterations')} distillation iterations, "
        f"{p.get('batch_real')} real images per class per iteration from a pool of {p.get('per_class_pool')} per class, "
        f"evaluation nets trained {p.get('eval_epochs')} epochs with DSA and tested on the first {p.get('test_limit')} "
        f"test images, {p.get('n_sets')} sets × {p.get('n_nets')} nets; CF matching with {p.get('num_freqs')} "
        f"frequencies; {p.get('threads')} torch thread(s) per process on {p.get('machine')}.",
        f"Published, for scale: {PUBLISHED} (width 128, 20,000 iterations, 1,000 evaluation epochs, 5 × 20 runs).",
        "",
        "std is over the n runs (ddof 0). Random real set k is exactly the initialisation of distilled set k (same seed, same "
        "draws), so the rows of one dataset and IPC are paired. Times are per set on a shared, loaded machine; wall s is "
        "the method's total (its sets' distillation plus evaluation).",
        *([note] if note else []),
    ]
    (RESULTS / "distill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fmnist", "cifar10"], choices=list(NAMES))
    ap.add_argument("--ipc", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--methods", nargs="+", default=["random", "dm", "dm_flip", "ncfm"],
                    choices=["random", "dm", "dm_flip", "ncfm"])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch-real", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", nargs="+", type=int, default=[300, 100],
                    help="evaluation epochs, one per --ipc value (or one for all)")
    ap.add_argument("--n-sets", type=int, default=2)
    ap.add_argument("--n-nets", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--num-freqs", type=int, default=1024)
    ap.add_argument("--dm-lr", type=float, default=1.0)
    ap.add_argument("--ncfm-lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true", help="only merge the partial results into results/distill.{json,md}")
    ap.add_argument("--command", default=" ".join(sys.argv), help="the command line to record in the results")
    ap.add_argument("--note", default="", help="a line to add under the table (e.g. the total wall time)")
    args = ap.parse_args()
    if args.merge:
        merge(args.command, args.note)
        return
    torch.set_num_threads(args.threads)
    for ds in args.datasets:
        run_dataset(ds, args)


if __name__ == "__main__":
    main()
