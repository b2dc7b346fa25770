"""Incremental curation benchmark (issue #15): a growing dataset of precomputed embeddings curated in append mode,
against a from-scratch run over the union and a run over the new rows alone; plus an image-folder run showing that only
new and changed files are decoded.

Data (synthetic, exact ground truth): unit vectors in d = 128 drawn around 400 random concept centres (float32 files of
20k rows, LAION layout: emb/*.npy + meta/*.parquet with a `key` uid). Every increment is one new file of `--inc` rows,
of which 1% are exact copies and 1% near copies (cosine ≈ 0.9999) of rows from earlier files (the planted
cross-increment duplicates) and 0.5% near copies of rows of the same increment; 1% of the rows present are removed by
rewriting the earlier files that held them.

Per increment, each in its own process (peak RSS = that process's ru_maxrss):
  append       `run_in_process` with incremental.mode append on the grown source (the run directory carries on)
  scratch      the same config, recompute mode, new output root: store + k-means + steps over the union
  new_alone    the same config over the increment's file alone (what processing only the new rows costs)
Steps: exact_dup, semdedup eps 0.005 (k = 100). Reported: wall time, peak RSS, rows copied into the store, planted
cross-increment duplicates found (recall), and recall against the from-scratch run's duplicates among the new rows.
`--sweep` measures one increment on bases of several sizes for the log-log slope of increment time vs base size.
`--images` runs the image-folder variant (real digit PNGs, pixels embedder): +10% new, 1% changed, 1% deleted, and
counts the files decoded.

    nice -n 10 python benchmarks/incremental.py --base 200000 --inc 20000 --increments 3 --sweep 50000,100000,200000 --images

Timings on the shared 2-core machine are inflated by other jobs; the ratios measured side by side are what count.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM, CENTRES, FILE_ROWS = 128, 400, 20_000
STEPS = [{"scorer": "exact_dup"}, {"scorer": "semdedup", "eps": 0.005}]


# ---- data --------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Growing:
    """The growing precomputed dataset on disk, with the planted duplicates' ground truth."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.centres = _unit(self.rng.normal(size=(CENTRES, DIM)))
        self.files: list[str] = []
        self.planted: dict[str, str] = {}  # planted duplicate uid → uid of the original (earlier increment)
        self.counter = 0
        (root / "emb").mkdir(parents=True, exist_ok=True)
        (root / "meta").mkdir(parents=True, exist_ok=True)

    def _fresh(self, n: int) -> np.ndarray:
        c = self.centres[self.rng.integers(0, CENTRES, n)]
        return _unit(c + 0.35 * self.rng.normal(size=(n, DIM)) / np.sqrt(DIM) * 4)

    def _write(self, name: str, emb: np.ndarray, uids: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        np.save(self.root / "emb" / f"{name}.npy", emb)
        pq.write_table(pa.table({"key": uids}), self.root / "meta" / f"{name}.parquet")
        if name not in self.files:
            self.files.append(name)

    def _read(self, name: str) -> tuple[np.ndarray, list[str]]:
        import pyarrow.parquet as pq

        return np.load(self.root / "emb" / f"{name}.npy"), pq.read_table(self.root / "meta" / f"{name}.parquet")["key"].to_pylist()

    def base(self, n: int) -> None:
        for start in range(0, n, FILE_ROWS):
            m = min(FILE_ROWS, n - start)
            self._write(f"f{len(self.files):04d}", self._fresh(m), [f"u{self.counter + i:09d}" for i in range(m)])
            self.counter += m

    def increment(self, n: int, *, remove_fraction: float = 0.01) -> dict[str, int]:
        """One new file of n rows with planted duplicates of earlier rows; removes remove_fraction of the rows present
        by rewriting the earlier files that held them. Returns what was planted and removed."""
        earlier = self.files[:]
        emb = self._fresh(n)
        uids = [f"u{self.counter + i:09d}" for i in range(n)]
        self.counter += n
        n_exact, n_near, n_within = n // 100, n // 100, n // 200
        slots = self.rng.permutation(n)
        sources = [self._read(name) for name in earlier]
        sizes = np.array([len(u) for _, u in sources])
        picks = self.rng.choice(int(sizes.sum()), size=n_exact + n_near, replace=False)
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        for j, p in enumerate(picks):
            f = int(np.searchsorted(offsets, p, side="right") - 1)
            row = int(p - offsets[f])
            original_emb, original_uid = sources[f][0][row], sources[f][1][row]
            slot = int(slots[j])
            if j < n_exact:
                emb[slot] = original_emb
            else:
                emb[slot] = _unit(original_emb[None] + 0.0035 * self.rng.normal(size=(1, DIM)) / np.sqrt(DIM) * 4)[0]
            self.planted[uids[slot]] = original_uid
        for j in range(n_within):  # near copies inside the increment (not counted as cross-increment)
            a, b = int(slots[n_exact + n_near + 2 * j]), int(slots[n_exact + n_near + 2 * j + 1])
            emb[b] = _unit(emb[a][None] + 0.0035 * self.rng.normal(size=(1, DIM)) / np.sqrt(DIM) * 4)[0]
        # removals: rows of earlier files (planted originals excluded so recall stays defined)
        originals = set(self.planted.values())
        to_remove = int(remove_fraction * (sizes.sum()))
        removed = 0
        for f in self.rng.permutation(len(earlier)):
            if removed >= to_remove:
                break
            e, u = sources[f]
            candidates = [i for i, uid in enumerate(u) if uid not in originals]
            take = set(self.rng.choice(candidates, size=min(len(candidates), to_remove - removed), replace=False).tolist())
            keep = [i for i in range(len(u)) if i not in take]
            self._write(earlier[f], e[keep], [u[i] for i in keep])
            removed += len(take)
        self._write(f"f{len(self.files):04d}", emb, uids)
        return {"rows": n, "planted_exact": n_exact, "planted_near": n_near, "within_near": n_within, "removed": removed,
                "file": self.files[-1]}


# ---- one measured run in a child process -------------------------------------------------------------------------
CHILD = r"""
import json, resource, sys, time
from pipeline.config import CurateConfig
from pipeline.stages import run_in_process
cfg = CurateConfig.model_validate(json.loads(sys.argv[1]))
t0 = time.perf_counter()
info = run_in_process(cfg)
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "info": {k: info.get(k) for k in ("counts", "incremental", "delta", "version", "timings_s")}}))
"""


THREADS = {"n": 2}  # BLAS/OpenMP threads of each measured run (--threads)


def measured_run(config: dict) -> dict:
    n = str(THREADS["n"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # the shared machine's load, before/after
    return result


def config(data: Path, out: Path, *, mode: str, files: list[str] | None = None, k: int = 100) -> dict:
    emb = [str(data / "emb" / f"{f}.npy") for f in files] if files else str(data / "emb" / "*.npy")
    meta = [str(data / "meta" / f"{f}.parquet") for f in files] if files else str(data / "meta" / "*.parquet")
    return {"name": "bench", "source": {"kind": "precomputed", "emb_paths": emb, "meta_paths": meta, "uid_column": "key"},
            "embed": {"kind": "precomputed", "dtype": "float16"}, "index": {"k": k, "niter": 10},
            "steps": STEPS, "incremental": {"mode": mode}, "output_root": str(out), "report": False}


def duplicates_found(run_dir: Path, uids: list[str]) -> set[str]:
    import polars as pl

    frame = pl.scan_parquet(str(run_dir / "manifest.parquet" / "*.parquet")).filter(pl.col("uid").is_in(uids))
    return set(frame.filter(pl.col("reason").is_in(["exact_dup", "semdedup"])).select("uid").collect()["uid"].to_list())


def series(work: Path, base: int, inc: int, increments: int, *, scratch: bool, alone: bool) -> list[dict]:
    import polars as pl

    data = Growing(work / "data")
    data.base(base)
    runs = work / "runs"
    first = measured_run(config(data.root, runs, mode="append"))
    rows = [{"increment": 0, "base_rows": base, "append_s": round(first["wall_s"], 2), "append_rss_mb": round(first["peak_rss_mb"])}]
    for i in range(1, increments + 1):
        planted = data.increment(inc)
        result = measured_run(config(data.root, runs, mode="append"))
        info = result["info"]
        new_file_uids = pl.read_parquet(data.root / "meta" / f"{planted['file']}.parquet")["key"].to_list()
        cross = [u for u in new_file_uids if u in data.planted]
        found = duplicates_found(runs / "bench", cross)
        row = {"increment": i, "rows_before": int(info["counts"]["samples"]), **{k: v for k, v in planted.items() if k != "file"},
               "append_s": round(result["wall_s"], 2), "append_rss_mb": round(result["peak_rss_mb"]),
               "source_changes": info["incremental"]["source_changes"], "delta": info["delta"],
               "rows_copied": info["incremental"]["source_changes"]["new"] + info["incremental"]["source_changes"]["changed"],
               "planted_cross_dups": len(cross), "planted_found": len(found),
               "planted_recall": round(len(found) / max(len(cross), 1), 4),
               "append_stages_s": info["timings_s"], "append_load_1min": result["load_1min"],
               "parts_linked": info["incremental"].get("parts_linked")}
        if scratch:
            fresh = work / f"scratch{i}"
            s = measured_run(config(data.root, fresh, mode="recompute"))
            row.update(scratch_s=round(s["wall_s"], 2), scratch_rss_mb=round(s["peak_rss_mb"]))
            scratch_dups = duplicates_found(fresh / "bench", new_file_uids)
            ours = duplicates_found(runs / "bench", new_file_uids)
            row["recall_vs_scratch"] = round(len(scratch_dups & ours) / max(len(scratch_dups), 1), 4)
            row["scratch_dups_in_new"] = len(scratch_dups)
            shutil.rmtree(fresh, ignore_errors=True)
        if alone:
            lone = work / f"alone{i}"
            a = measured_run(config(data.root, lone, mode="recompute", files=[planted["file"]]))
            row.update(new_alone_s=round(a["wall_s"], 2), new_alone_rss_mb=round(a["peak_rss_mb"]),
                       ratio_vs_new_alone=round(result["wall_s"] / a["wall_s"], 2))
            shutil.rmtree(lone, ignore_errors=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sweep(work: Path, bases: list[int], inc: int) -> dict:
    points = []
    for base in bases:
        rows = series(work / f"sweep{base}", base, inc, 1, scratch=False, alone=False)
        stages = rows[1]["append_stages_s"]
        points.append({"base_rows": base, "increment_s": rows[1]["append_s"], "stages_s": stages,
                       "stages_sum_s": round(sum(stages.values()), 3), "load_1min": rows[1]["append_load_1min"]})
        shutil.rmtree(work / f"sweep{base}", ignore_errors=True)
        print(json.dumps(points[-1]), flush=True)
    x = np.log([p["base_rows"] for p in points])
    y = np.log([p["increment_s"] for p in points])
    slope = float(np.polyfit(x, y, 1)[0]) if len(points) > 1 else float("nan")
    y_stages = np.log([p["stages_sum_s"] for p in points])
    slope_stages = float(np.polyfit(x, y_stages, 1)[0]) if len(points) > 1 else float("nan")
    # wall = the child's whole run (imports included, ~5 s that do not depend on the base); stages = the timed stages
    return {"points": points, "loglog_slope": round(slope, 3), "loglog_slope_stages": round(slope_stages, 3)}


def images(work: Path) -> dict:
    """Real digit PNGs, pixels embedder: +10% new, 1% changed, 1% deleted; counts decode_image calls per run."""
    import pipeline.embed.loop as loop
    from flows.demo import write_digits
    from pipeline.config import CurateConfig
    from pipeline.stages import run_in_process

    root = work / "digits"
    write_digits(root)
    files = sorted(p for p in root.rglob("*.png"))
    rng = np.random.default_rng(0)
    held = set(rng.choice(len(files), size=len(files) // 11, replace=False).tolist())  # ~10% held back as "new"
    stash = work / "stash"
    for i in held:
        dest = stash / files[i].relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(files[i], dest)
    calls = {"n": 0}
    real = loop.decode_image

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    loop.decode_image = counting
    cfg = CurateConfig.model_validate({
        "name": "images", "source": {"kind": "image_folder", "root": str(root)},
        "embed": {"kind": "pixels", "shard_size": 500, "num_workers": 0, "pixels": {"size": 8, "grey": True, "dim": 16}},
        "index": {"k": 10}, "steps": STEPS, "incremental": {"mode": "append"}, "output_root": str(work / "runs"), "report": False})
    run_in_process(cfg)
    first = calls["n"]
    present = sorted(p for p in root.rglob("*.png"))
    for p in stash.rglob("*.png"):
        dest = root / p.relative_to(stash)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dest)
    n = len(present)
    picks = rng.permutation(n)
    changed, deleted = picks[: n // 100], picks[n // 100: 2 * (n // 100)]
    from PIL import Image

    for i in changed:
        Image.open(present[i]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(present[i])
    for i in deleted:
        present[i].unlink()
    calls["n"] = 0
    t0 = time.perf_counter()
    info = run_in_process(cfg)
    loop.decode_image = real
    return {"files_first_run": n, "decoded_first_run": first, "added": len(held), "changed": len(changed), "deleted": len(deleted),
            "decoded_increment": calls["n"], "increment_s": round(time.perf_counter() - t0, 2),
            "source_changes": info["incremental"]["source_changes"], "delta": info["delta"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=200_000)
    parser.add_argument("--inc", type=int, default=20_000)
    parser.add_argument("--increments", type=int, default=3)
    parser.add_argument("--sweep", default="", help="comma-separated base sizes for the slope (one increment each)")
    parser.add_argument("--images", action="store_true")
    parser.add_argument("--no-series", action="store_true", help="skip the increments series (sweep and/or images only)")
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS/OpenMP threads per measured run (on a loaded 2-core machine, 2 threads make the many "
                             "small matrix products of cross-run SemDeDup several times slower than 1)")
    parser.add_argument("--work", default="/tmp/winnow-bench-incremental")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "incremental.json"))
    args = parser.parse_args()
    THREADS["n"] = args.threads
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    result: dict = {"settings": {"base": args.base, "inc": args.inc, "increments": args.increments, "dim": DIM, "steps": STEPS,
                                 "k": 100, "threads": args.threads,
                                 "machine": "shared 2-core box (timings inflated by other jobs)"}}
    result["load_1min_at_start"] = round(os.getloadavg()[0], 2)
    if not args.no_series:
        result["series"] = series(work / "main", args.base, args.inc, args.increments, scratch=True, alone=True)
    if args.sweep:
        result["sweep"] = sweep(work, [int(b) for b in args.sweep.split(",")], args.inc)
    if args.images:
        result["images"] = images(work / "images")
        print(json.dumps(result["images"]), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
