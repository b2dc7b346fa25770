"""Scaling benchmark: the curate flow from 10k to 10M embeddings, per stage, on each task runner.

Data (made here, deterministic, cached under benchmarks/.cache/scaling/<N>/): N unit 512-d float16 embeddings
around 1000 random unit centres (x = normalise(c + s·g/√d), s ~ U(0.7, 1.3)) with 5% planted near-copies, written
as a precomputed source (LAION layout: emb_<i>.npy + meta_<i>.parquet, 10 files up to 1M, 100k rows per file
above). The flow then copies it into a store (one task per file), fits spherical k-means (k = 1000, 256 points
per centroid: a fixed-size sample), assigns every shard (one task per shard), runs SemDeDup (eps 0.01, cluster
batches as tasks) and DBP (keep 50%), and writes the manifest.

Modes, each in a fresh subprocess:
  direct  the stage functions called in one process without Prefect (the single-process path)
  local   run_curate with runner {kind: local, workers: 2} (Prefect's thread pool)
  dask    run_curate with runner {kind: dask, workers: 2} (a Dask LocalCluster of 2 worker processes)
Per stage: wall time (run.json timings) and peak RSS of the whole process tree (the flow process, Dask workers,
Prefect's server) sampled every 0.2 s with psutil and attributed to the stage whose span holds the sample.

    python benchmarks/scaling.py --sizes 10000 100000 1000000 --modes direct local dask
    python benchmarks/scaling.py --sizes 10000000 --modes local      # once, recorded

Results merge into benchmarks/results/scaling.json; scaling.md (tables, log-log slopes) and scaling.png
(time vs N per stage, log-log) are rewritten from it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / ".cache" / "scaling"
DIM = 512
N_CENTRES = 1000
NEAR_DUP_FRACTION = 0.05
STAGES = ["ingest", "embed", "index", "score", "manifest"]


def rows_per_file(n: int) -> int:
    return max(1, n // 10) if n <= 1_000_000 else 100_000


def make_data(n: int) -> Path:
    """Writes (once) the N-row precomputed source; returns its folder."""
    import polars as pl

    folder = CACHE / str(n)
    done = folder / "_complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.7, 1.3, N_CENTRES).astype(np.float32)
    per_file = rows_per_file(n)
    for i, start in enumerate(range(0, n, per_file)):
        m = min(per_file, n - start)
        c = rng.integers(0, N_CENTRES, m)
        x = centres[c] + spread[c, None] * rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
        n_dup = int(NEAR_DUP_FRACTION * m)
        src = rng.integers(0, m, n_dup)
        dst = rng.choice(m, n_dup, replace=False)
        x[dst] = x[src] + rng.uniform(0.01, 0.08, (n_dup, 1)).astype(np.float32) * rng.standard_normal((n_dup, DIM), dtype=np.float32) / np.sqrt(DIM)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / f"emb_{i:05d}.npy", x.astype(np.float16))
        pl.DataFrame({"key": [f"s{start + j:09d}" for j in range(m)]}).write_parquet(folder / f"meta_{i:05d}.parquet")
    done.write_text("ok")
    return folder


STEP_SETS = {
    "full": [{"scorer": "semdedup", "eps": 0.01}, {"scorer": "dbp", "keep_fraction": 0.5}],
    # SemDeDup is O(N²/k) at a fixed k; without it every stage is meant to be linear in N
    "dbp": [{"scorer": "dbp", "keep_fraction": 0.5}],
}


def config(n: int, data: Path, out: Path, mode: str, steps: str) -> dict[str, Any]:
    runner = {"kind": "dask" if mode == "dask" else "local", "workers": 2}
    return {
        "name": f"scaling-{n}-{mode}",
        "source": {"kind": "precomputed", "emb_paths": str(data / "emb_*.npy"), "meta_paths": str(data / "meta_*.parquet")},
        "embed": {"kind": "precomputed", "dtype": "float16"},
        "index": {"k": N_CENTRES, "niter": 20, "seed": 1234, "max_points_per_centroid": 256},
        "runner": runner,
        "steps": STEP_SETS[steps],
        "output_root": str(out),
        "report": False,
    }


class RssSampler:
    """Samples the RSS of this process and all its descendants every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (unix time, own rss, tree rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            own = self.proc.memory_info().rss
            tree = own
            for child in self.proc.children(recursive=True):
                try:
                    tree += child.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.time(), own, tree))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_direct(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The single-process path: the same stage functions, no Prefect, serial fan-out."""
    from pipeline import stages
    from pipeline.config import CurateConfig

    return stages.run_in_process(CurateConfig.model_validate(cfg_dict))


def one(n: int, mode: str, steps: str, out: Path) -> dict[str, Any]:
    """One measured run (called in a fresh subprocess)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    data = make_data(n)
    shutil.rmtree(out, ignore_errors=True)
    cfg = config(n, data, out, mode, steps)
    with RssSampler() as sampler:
        start = time.time()
        if mode == "direct":
            info = run_direct(cfg)
        else:
            from flows.curate import run_curate

            info = run_curate(cfg)
        wall = time.time() - start
    stages_out = {}
    for name, (a, b) in info["stage_spans"].items():
        inside = [s for s in sampler.samples if a <= s[0] <= b] or [min(sampler.samples, key=lambda s: abs(s[0] - b))]
        stages_out[name] = {
            "seconds": info["timings_s"].get(name, round(b - a, 3)),
            "peak_rss_gb": round(max(s[2] for s in inside) / 1e9, 3),
            "peak_rss_own_gb": round(max(s[1] for s in inside) / 1e9, 3),
        }
    shutil.rmtree(out, ignore_errors=True)  # the store copy is as large as the data
    return {
        "n": n, "mode": mode, "steps": steps, "wall_s": round(wall, 2), "stages": stages_out,
        "peak_rss_gb": round(max(s[2] for s in sampler.samples) / 1e9, 3),
        "kept": info["counts"]["kept"], "samples": info["counts"]["samples"],
    }


def slope(ns: list[int], ts: list[float]) -> float | None:
    pairs = [(n, t) for n, t in zip(ns, ts) if t and t > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def write_outputs(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Scaling: the curate flow from a precomputed float16 store, per stage",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}; command: `python benchmarks/scaling.py` (see the module docstring).",
        "Seconds per stage (peak RSS of the process tree in GB in brackets). `embed` = copying the precomputed files into",
        "the store; `index` = k-means fit on a fixed 256k-row sample + assignment of every shard; `score` = SemDeDup + DBP.",
        "",
        "| N | mode | ingest | embed | index | score | manifest | wall | peak RSS GB | kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def series(r: dict[str, Any]) -> str:
        return f"{r['mode']}, {r['steps']}"

    for r in sorted(results, key=lambda r: (r["steps"], r["n"], r["mode"])):
        cells = []
        for name in STAGES:
            s = r["stages"].get(name)
            cells.append(f"{s['seconds']:.1f} ({s['peak_rss_gb']:.2f})" if s else "–")
        lines.append(f"| {r['n']:,} | {series(r)} | " + " | ".join(cells) + f" | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['kept']:,} |")
    lines += ["", "Log-log slope of time vs N (sizes of 100k and above that were measured):", "",
              "| mode, steps | sizes | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    names = sorted({series(r) for r in results})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name_ in zip(axes[0], names):
        runs = sorted((r for r in results if series(r) == name_), key=lambda r: r["n"])
        big = [r for r in runs if r["n"] >= 100_000]
        cells = []
        for name in STAGES:
            ns = [r["n"] for r in runs if name in r["stages"]]
            ts = [r["stages"][name]["seconds"] for r in runs if name in r["stages"]]
            if ns:
                ax.loglog(ns, np.maximum(ts, 1e-3), marker="o", label=name)
            k = slope([r["n"] for r in big if name in r["stages"]], [r["stages"][name]["seconds"] for r in big if name in r["stages"]])
            cells.append("–" if k is None else f"{k:.2f}")
        sizes = ", ".join(f"{r['n']:,}" for r in big)
        lines.append(f"| {name_} | {sizes} | " + " | ".join(cells) + " |")
        ax.set_title(name_)
        ax.set_xlabel("N embeddings")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=100)
    by = {(r["n"], r["mode"], r["steps"]): r for r in results}
    ratios = [f"- N = {n:,} ({st}): local / direct = {by[(n, 'local', st)]['wall_s'] / by[(n, 'direct', st)]['wall_s']:.2f}"
              + (f", dask / direct = {by[(n, 'dask', st)]['wall_s'] / by[(n, 'direct', st)]['wall_s']:.2f}" if (n, "dask", st) in by else "")
              for (n, mode, st) in sorted(by) if mode == "direct" and (n, "local", st) in by]
    if ratios:
        lines += ["", "Wall time against the single-process path (same stages, no Prefect):", "", *ratios]
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", default=["direct", "local", "dask"], choices=["direct", "local", "dask"])
    parser.add_argument("--steps", default="full", choices=sorted(STEP_SETS), help="full: SemDeDup + DBP; dbp: DBP only")
    parser.add_argument("--one", nargs=3, metavar=("N", "MODE", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args()
    if args.one:
        n, mode, steps = int(args.one[0]), args.one[1], args.one[2]
        print("RESULT " + json.dumps(one(n, mode, steps, CACHE / "runs" / f"{n}-{mode}-{steps}")), flush=True)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for n in args.sizes:
        make_data(n)
        for mode in args.modes:
            print(f"== N={n:,} mode={mode} steps={args.steps}", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", str(n), mode, args.steps], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run N={n} mode={mode} failed (exit {proc.returncode})")
            result = json.loads(line[len("RESULT "):])
            print(json.dumps(result), flush=True)
            results = [r for r in results if (r["n"], r["mode"], r["steps"]) != (n, mode, args.steps)] + [result]
            args.out.write_text(json.dumps(results, indent=1))
            write_outputs(results)


if __name__ == "__main__":
    main()
