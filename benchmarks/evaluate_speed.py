"""How long `winnow evaluate` takes on a 50k-row store (target: ≤ 60 s on 2 CPU cores, embedding probe).

Store: CIFAR-10 train (50,000 real images, the shared JPEG re-encoding) as 512-d embeddings: 16×16 RGB pixels (768
values) through a fixed Gaussian random projection to 512 dims, L2-normalised, entered as a precomputed source. The
features only have to be realistic in size and label structure; their quality does not change the cost much. The run
itself is one DBP step keeping 50% (so there is a selection to evaluate). Timed: `evaluate_run` (selection vs 5 random
subsets vs the full pool, linear probes, 2000 bootstrap replicates), then the same with `--sweep` (7 rules × 4 fractions).

Usage: ``nice -n 10 python benchmarks/evaluate_speed.py [--rows 50000] [--threads 2]``; writes
benchmarks/results/evaluate_speed.json and .md. Timings on a shared machine are inflated by other jobs (the load average
at the start and end is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common_data import load_cifar10  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def features(x_u8: np.ndarray, dim: int = 512, seed: int = 0) -> np.ndarray:
    """16×16 RGB (2×2 mean-pooled), centred, random Gaussian projection to ``dim``, unit rows."""
    pooled = x_u8.reshape(-1, 16, 2, 16, 2, 3).mean((2, 4), dtype=np.float32).reshape(len(x_u8), -1) / 255.0
    pooled -= pooled.mean(0)
    proj = np.random.default_rng(seed).normal(size=(pooled.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
    z = pooled @ proj
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(args.threads)
    from pipeline import stages
    from pipeline.config import CurateConfig, EvaluateConfig
    from pipeline.evaluate import evaluate_run, format_evaluation

    load_start = os.getloadavg()
    d = load_cifar10()
    x = features(np.asarray(d["x_train"][: args.rows]))
    y = d["y_train"][: args.rows]
    out: dict = {"rows": int(len(x)), "dim": int(x.shape[1]), "threads": args.threads, "load_avg_start": load_start}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "emb").mkdir()
        (tmp / "meta").mkdir()
        np.save(tmp / "emb" / "000.npy", x)
        pq.write_table(pa.table({"key": [f"cifar/{i:05d}" for i in range(len(x))], "label": [str(v) for v in y]}),
                       tmp / "meta" / "000.parquet")
        cfg = CurateConfig.model_validate({
            "name": "speed", "output_root": str(tmp / "runs"), "embed": {"kind": "precomputed"}, "index": {"k": 100},
            "source": {"kind": "precomputed", "emb_paths": str(tmp / "emb" / "*.npy"),
                       "meta_paths": str(tmp / "meta" / "*.parquet"), "label_column": "label"},
            "steps": [{"scorer": "dbp", "keep_fraction": 0.5}],
        })
        t = time.perf_counter()
        stages.run_in_process(cfg)
        out["curate_seconds"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        result = evaluate_run(cfg.run_dir, EvaluateConfig())
        out["evaluate_seconds"] = round(time.perf_counter() - t, 2)
        print(format_evaluation(result), flush=True)
        out["evaluate"] = result
        t = time.perf_counter()  # the same with twice the probe iterations: time and what it does to the answer
        slow = evaluate_run(cfg.run_dir, EvaluateConfig(probe_iterations=100))
        out["evaluate_100_iterations_seconds"] = round(time.perf_counter() - t, 2)
        print(format_evaluation(slow), flush=True)
        out["evaluate_100_iterations"] = slow
        if not args.no_sweep:
            t = time.perf_counter()
            result = evaluate_run(cfg.run_dir, EvaluateConfig(sweep=True))
            out["evaluate_sweep_seconds"] = round(time.perf_counter() - t, 2)
            print(format_evaluation(result), flush=True)
            out["evaluate_sweep"] = result
    out["load_avg_end"] = os.getloadavg()
    out["target_met"] = out["evaluate_seconds"] <= 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluate_speed.json").write_text(json.dumps(out, indent=1, default=float))
    md = [
        "# `winnow evaluate` on a 50k-row store (benchmarks/evaluate_speed.py)", "",
        f"{out['rows']} rows × {out['dim']} dims (CIFAR-10 train, 16×16 pixels randomly projected to 512-d), {args.threads} torch threads, "
        f"load average {load_start[0]:.1f} at the start and {out['load_avg_end'][0]:.1f} at the end (shared machine: timings inflated).", "",
        "| what | seconds | target |", "|---|---|---|",
        f"| `winnow evaluate` (selection vs 5 random vs full, linear probes, default 50 L-BFGS iterations) | {out['evaluate_seconds']:.1f} | ≤ 60: {'met' if out['target_met'] else 'NOT met'} |",
        f"| the same, `--probe-iterations 100` | {out['evaluate_100_iterations_seconds']:.1f} | |",
        "",
        "selection − random: {:+.2f} pp [{:+.2f}, {:+.2f}] with the default 50 iterations, {:+.2f} pp [{:+.2f}, {:+.2f}] with 100.".format(
            *(100 * v for r in (out["evaluate"], out["evaluate_100_iterations"])
              for v in (r["selection_vs_random"]["difference"], *r["selection_vs_random"]["difference_ci"]))),
    ]
    if "evaluate_sweep_seconds" in out:
        md.append(f"| `winnow evaluate --sweep` (7 rules × 4 fractions + the above) | {out['evaluate_sweep_seconds']:.1f} | – |")
    md += ["", "```", format_evaluation(out.get("evaluate_sweep", out["evaluate"])), "```", ""]
    (RESULTS / "evaluate_speed.md").write_text("\n".join(md))
    print(f"evaluate {out['evaluate_seconds']} s; sweep {out.get('evaluate_sweep_seconds')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
