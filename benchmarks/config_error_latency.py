"""Time from `winnow run` to its one-line config error (target: <= 1 s; DESIGN.md "Per-run overhead").

Each case is a real `winnow run` subprocess on a bad config; wall time is the median of `--repeats` runs (the first run
of a case also warms the file cache). CPU time (user + sys of the child) is reported too: on a shared machine wall time
is inflated by other jobs, CPU time much less so. Writes benchmarks/results/config_error_latency.json.

    python benchmarks/config_error_latency.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "yaml_syntax": "source: {kind: image_folder, root: imgs\n",
    "top_level_typo": "sorce: {kind: image_folder, root: imgs}\n",
    "knob_typo": "source: {kind: image_folder, root: imgs}\nsteps: [{scorer: random, keep_fration: 0.5}]\n",
    "missing_source_root": "source: {kind: image_folder, root: no/such/folder}\nembed: {kind: pixels}\n",
    "budgets_cannot_apply": (
        "source: {kind: image_folder, root: imgs}\nembed: {kind: pixels}\n"
        "steps: [{scorer: semdedup, target_keep_of_entering: 0.3}, {scorer: dbp, keep_fraction: 0.5}]\n"
    ),
}


def time_case(config: Path, repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(repeats + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert out.returncode == 2 and out.stderr.startswith("winnow: error:"), out.stderr[-500:]
        walls.append(wall)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    walls, cpus = walls[1:], cpus[1:]  # the first run warms the file cache
    return {"wall_median_s": round(statistics.median(walls), 3), "wall_min_s": round(min(walls), 3),
            "cpu_median_s": round(statistics.median(cpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, object] = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "imgs").mkdir()
        for name, text in CASES.items():
            config = Path(tmp) / f"{name}.yaml"
            config.write_text(text)
            results["cases"][name] = time_case(config, args.repeats)  # type: ignore[index]
            print(name, results["cases"][name])  # type: ignore[index]
    out = REPO / "benchmarks" / "results" / "config_error_latency.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
