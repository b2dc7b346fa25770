"""Listing an image folder of N files: peak RSS and time, before (one SampleRef per file) vs after (columns) (#15).

Makes N empty files with an image extension (the listing never reads them) in folders of 1,000 under class folders,
then, each in its own fresh process, runs what an incremental run does before embedding:
  list      ``ImageFolderSource(root).refs()``: the walk, sort, label rule and uid check
  detect    ``pipeline.changes.listing_frame(refs, source)``: uid, size and mtime of every file as columns (the old code
            stats every file here; the new one recorded them during the walk)
  shard     the refs of one 10,000-row embedding shard (``refs[...]`` before, ``refs.take(...)`` after) and their SampleRefs
Reported per process: seconds per phase, RSS held by the listing after ``list`` (VmRSS after − before), the same 15 s
later (polars' allocator returns freed pages after a few seconds, so the first figure counts memory already freed), the
columns' own size (polars ``estimated_size``, after only), peak RSS over the whole process (VmHWM) and the
interpreter's baseline, all in MB. Each code version is a repository folder put first
on PYTHONPATH: ``--before`` (e.g. an export of main before the change) and this repository.

    nice -n 10 python benchmarks/listing_memory.py --files 1000000 --before /tmp/winnow-before

``--precomputed 200000,2000000``: the listing of a grown precomputed source (benchmarks/incremental.py's synthetic
data: files of 20k rows, a 20k-row increment that also rewrites the earlier files holding its 1% removals), timed in one
process, alternately: ``scan_shards()`` without the uid-hash cache (every metadata file read, as before the cache) and
``plan_ingest`` with it (the ingest stage of a run, its cache filled by the run before the increment).

Timings on the shared 2-core machine are inflated by other jobs; the ratios measured side by side are what count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, sys, time
import numpy as np

def mb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024

from pipeline.sources import ImageFolderSource
from pipeline.changes import listing_frame
import polars as pl
gc.collect()
base_rss = mb("VmRSS")
out = {"baseline_rss_mb": round(base_rss, 1)}
t = time.perf_counter()
src = ImageFolderSource(sys.argv[1])
refs = src.refs()
out["list_s"] = round(time.perf_counter() - t, 2)
gc.collect()
out["held_after_list_mb"] = round(mb("VmRSS") - base_rss, 1)
out["rows"] = len(refs)
out["type"] = type(refs).__name__
t = time.perf_counter()
frame = listing_frame(refs, src)
out["detect_s"] = round(time.perf_counter() - t, 2)
rows = np.arange(len(refs) // 2, min(len(refs), len(refs) // 2 + 10_000))
t = time.perf_counter()
shard = refs.take(rows) if hasattr(refs, "take") else [refs[i] for i in rows]
first = [r.uid for r in shard][:1]
out["shard_s"] = round(time.perf_counter() - t, 3)
out["held_end_mb"] = round(mb("VmRSS") - base_rss, 1)
out["peak_rss_mb"] = round(mb("VmHWM"), 1)
# polars' allocator hands freed pages back after a few seconds: RSS right after listing counts pages already freed
time.sleep(15)
pl.DataFrame({"a": [2, 1]}).sort("a")  # lets the allocator run its decay
time.sleep(1)
gc.collect()
out["held_after_15s_mb"] = round(mb("VmRSS") - base_rss, 1)
out["columns_mb"] = round(refs.frame.estimated_size() / 2**20, 1) if hasattr(refs, "frame") else None
out["shard_type"] = type(shard).__name__
out["first_uid"], out["frame_rows"] = first[0], frame.height
print("RESULT " + json.dumps(out))
"""


def make_folder(root: Path, n: int, per_folder: int = 1000, classes: int = 10) -> None:
    """n empty .png files: root/c<k>/d<j>/<i>.png, per_folder files a folder."""
    for i in range(0, n, per_folder):
        folder = root / f"c{(i // per_folder) % classes}" / f"d{i // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(i, min(i + per_folder, n)):
            open(folder / f"{j:08d}.png", "wb").close()


def run(repo: Path, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "2"}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    result["process_s"] = round(time.perf_counter() - t, 2)
    result["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


def precomputed(work: Path, base: int, repeats: int) -> dict:
    """Seconds to list a grown precomputed source with and without the uid-hash cache, in this process."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import incremental as inc
    from pipeline.config import CurateConfig
    from pipeline.ingest import plan_ingest
    from pipeline.sources import source_from_config

    shutil.rmtree(work, ignore_errors=True)
    data = inc.Growing(work / "data")
    data.base(base)
    cfg = CurateConfig.model_validate(inc.config(data.root, work / "runs", mode="append"))
    t = time.perf_counter()
    plan_ingest(cfg)  # the previous run: reads every file, fills the cache
    first = time.perf_counter() - t
    data.increment(20_000)
    out: dict = {"base_rows": base, "files": len(data.files), "first_run_s": round(first, 3), "no_cache_s": [], "cache_s": []}
    for _ in range(repeats):
        t = time.perf_counter()
        source_from_config(cfg.source.arguments()).scan_shards()
        out["no_cache_s"].append(round(time.perf_counter() - t, 3))
        cache = cfg.store_path / "source_uids"
        saved = work / "saved_cache"
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(cache, saved)  # each timed cached scan starts from the cache the previous run left
        t = time.perf_counter()
        plan_ingest(cfg)
        out["cache_s"].append(round(time.perf_counter() - t, 3))
        shutil.rmtree(cache)
        shutil.copytree(saved, cache)
    out["load_1min"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="1000000", help="comma-separated folder sizes (files)")
    parser.add_argument("--before", default="", help="a repository folder with the code to compare against")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each version per size, interleaved")
    parser.add_argument("--precomputed", default="", help="comma-separated base sizes (rows) for the precomputed listing")
    parser.add_argument("--work", default="/tmp/winnow-bench-listing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "listing_memory.json"))
    args = parser.parse_args()
    versions = [("after", REPO)] + ([("before", Path(args.before).resolve())] if args.before else [])
    work = Path(args.work)
    result: dict = {"machine": "shared 2-core box (timings inflated by other jobs)", "points": []}
    for n in [int(x) for x in args.files.split(",") if x and int(x) > 0]:
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        make_folder(work / "root", n)
        made_s = round(time.perf_counter() - t, 1)
        for repeat in range(args.repeats):
            for name, repo in (versions if repeat % 2 == 0 else versions[::-1]):
                point = {"files": n, "code": name, "repeat": repeat, "make_folder_s": made_s, **run(repo, work / "root")}
                print(json.dumps(point), flush=True)
                result["points"].append(point)
        shutil.rmtree(work, ignore_errors=True)
    for base in [int(x) for x in args.precomputed.split(",") if x]:
        point = precomputed(work / "precomputed", base, max(args.repeats, 2))
        print(json.dumps(point), flush=True)
        result.setdefault("precomputed", []).append(point)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
