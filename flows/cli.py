"""`winnow` command line: run, deploy, demo, report, validate, summary, distill, evaluate."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE (dotted keys, e.g. index.k=50), got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def format_summary(info: dict[str, Any], manifest_path: Path) -> str:
    """The human summary of a run: counts per stage and reason, time per stage, where the manifest is."""
    counts = info["counts"]
    lines = [f"winnow run '{info['config']['name']}' — embedder: {info['config']['embed']['kind']}"]
    lines.append(f"  samples: {counts['samples']}   kept: {counts['kept']} ({counts['kept'] / max(counts['samples'], 1):.1%})")
    lines.append("  store status: " + ", ".join(f"{k}={v}" for k, v in counts.get("store_status", {}).items()))
    if counts.get("embed_shards_skipped"):
        lines.append(f"  embed shards reused from an earlier run: {counts['embed_shards_skipped']}")
    lines.append("  steps:")
    for note in info["steps"]:
        lines.append(f"    {note['scorer']:<12} dropped {note['dropped']:>7}   left {note['alive_after']:>7}")
    lines.append("  by reason: " + ", ".join(f"{k}={v}" for k, v in counts["by_reason"].items()))
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in info["timings_s"].items()))
    unlisted = counts.get("unlisted_folders")
    if unlisted:
        shown = ", ".join(f"{f['path']} ({f['why']})" for f in unlisted["folders"][:5])
        lines.append(f"  warning: {unlisted['count']} folder(s) of the source could not be listed, their images are not in "
                     f"the manifest: {shown}{' ...' if unlisted['count'] > 5 else ''}")
    if "evaluation" in info:
        from pipeline.evaluate import format_evaluation

        lines.append("  " + format_evaluation(info["evaluation"]).replace("\n", "\n  "))
    lines.append(f"  manifest: {manifest_path}")
    lines.append(f"  query it: python -c \"import polars as pl; print(pl.read_parquet('{manifest_path}').group_by('reason').len())\"")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.curate import run_curate
    from pipeline.config import load_config

    cfg = load_config(args.config, _parse_overrides(args.set))
    info = run_curate(cfg.model_dump(mode="json"))
    print(format_summary(info, cfg.run_dir / "manifest.parquet"))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import serve_curate

    serve_curate(args.config, cron=args.cron, name=args.name, dry_run=args.dry_run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    print(format_summary(*run_demo(Path(args.out))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(f"report written: {write_report(args.run_dir, args.out)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.manifest import read_manifest

    frame = read_manifest(args.manifest)
    print(f"{args.manifest}: valid manifest, {frame.height} rows, {int(frame['keep'].sum())} kept, columns {frame.columns}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pipeline.manifest import manifest_parts, read_run_info

    info = read_run_info(args.run_dir)
    manifest_parts(args.run_dir)  # parts that disagree with the manifest's index are an error, not a summary
    print(json.dumps(info, indent=2) if args.json else format_summary(info, Path(args.run_dir) / "manifest.parquet"))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from flows.distill import distill
    from pipeline.distill import load_distill_config

    cfg = load_distill_config(args.config, _parse_overrides(args.set))
    info = distill(config=cfg.model_dump(mode="json"))
    ev = info.get("evaluation", {})
    print(f"winnow distill '{cfg.name}': {info['method']}, {info['counts']['synthetic']} synthetic samples "
          f"({cfg.ipc} per class) in {cfg.run_dir}")
    for key in ("synthetic", "random_real"):
        if key in ev:
            print(f"  {key:<12} test accuracy {100 * ev[key]['mean']:.2f} ± {100 * ev[key]['std']:.2f} (n={ev[key]['n']})")
    print(f"  manifest: {cfg.run_dir / 'manifest.parquet'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import evaluate_run, format_evaluation
    from pipeline.manifest import read_run_info

    # the run's own `evaluate:` block, then the flags given here
    base = read_run_info(args.run_dir).get("config", {}).get("evaluate") or {}
    flags = {k: v for k, v in {"sweep": args.sweep or None, "seeds": args.seeds, "probe": args.probe,
                               "holdout_fraction": args.holdout_fraction, "fractions": args.fractions}.items() if v is not None}
    result = evaluate_run(args.run_dir, EvaluateConfig.model_validate({**base, **flags}))
    print(format_evaluation(result))
    print(f"  written to {Path(args.run_dir) / 'run.json'} (key 'evaluation'); `winnow report {args.run_dir}` shows it")
    return 0


def _fractions(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="winnow",
        description="Dataset curation and data pruning: embed images, cluster them, score and prune, write a Parquet manifest.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the curate flow on a YAML config (Prefect's local server, no setup needed)")
    run.add_argument("config", help="path to the YAML config (see README 'Configuration')")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set index.k=50")
    run.set_defaults(fn=cmd_run)

    deploy = sub.add_parser("deploy", help="serve the curate flow on a cron schedule (needs a Prefect server: PREFECT_API_URL)")
    deploy.add_argument("config")
    deploy.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    deploy.add_argument("--name", default=None, help="deployment name (default: the config's name)")
    deploy.add_argument("--dry-run", action="store_true", help="build and print the deployment without serving it")
    deploy.set_defaults(fn=cmd_deploy)

    demo = sub.add_parser("demo", help="curate scikit-learn's bundled digits (1,797 real images) with the pixels embedder")
    demo.add_argument("--out", default="demo_data", help="where to write the images, the store and the manifest")
    demo.set_defaults(fn=cmd_demo)

    report = sub.add_parser("report", help="write a run's self-contained HTML report (opens nothing)")
    report.add_argument("run_dir", help="the run directory (holds manifest.parquet and run.json)")
    report.add_argument("--out", default=None, help="where to write it (default: RUN_DIR/report.html)")
    report.set_defaults(fn=cmd_report)

    validate = sub.add_parser("validate", help="check a manifest against the schema")
    validate.add_argument("manifest", help="the manifest.parquet directory, one of its part files, or the run directory")
    validate.set_defaults(fn=cmd_validate)

    distill = sub.add_parser("distill", help="synthesise a small training set (DM, DM+flip, NCFM-style CF) and evaluate it")
    distill.add_argument("config", help="path to the distill YAML config (see README 'Dataset distillation')")
    distill.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set ipc=1")
    distill.set_defaults(fn=cmd_distill)

    evaluate = sub.add_parser("evaluate", help="measure a run's selection against random subsets of the same size (probes on its embeddings)")
    evaluate.add_argument("run_dir", help="a finished run directory (its store must still exist; the source needs labels)")
    evaluate.add_argument("--sweep", action="store_true", help="also every rule at every kept fraction, and a suggested budget")
    evaluate.add_argument("--seeds", type=int, default=None, help="random subsets (and MLP seeds); default 5")
    evaluate.add_argument("--probe", choices=("linear", "mlp"), default=None, help="the proxy learner (default linear)")
    evaluate.add_argument("--holdout-fraction", type=float, default=None, help="test split by uid hash (default 0.2)")
    evaluate.add_argument("--fractions", type=_fractions, default=None, help="sweep kept fractions, e.g. 0.1,0.3,0.5,0.7")
    evaluate.set_defaults(fn=cmd_evaluate)

    summary = sub.add_parser("summary", help="print the summary of a finished run")
    summary.add_argument("run_dir")
    summary.add_argument("--json", action="store_true", help="print run.json as is")
    summary.set_defaults(fn=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        # Config, source, budget and schema errors carry messages meant for the user; no traceback wall.
        if os.environ.get("WINNOW_DEBUG"):
            raise
        print(f"winnow: error: {exc}  (WINNOW_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
