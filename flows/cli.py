"""`winnow` command line: run, deploy, demo, report, validate, summary, diff, store compact, distill, evaluate.

Heavy modules (torch, open_clip, Prefect) are imported inside the commands, after the config and the source have been
checked: a config error is reported in well under a second, before any server starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("winnow")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from pipeline.config import ConfigError

    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE (dotted keys, e.g. index.k=50 or steps.1.keep_fraction=0.3), got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            overrides[key] = value  # not YAML: the literal text
    return overrides


def polars_one_liner(manifest_path: Path) -> str:
    """A shell command that prints the manifest's rows per reason; quoted for the shell the user is in."""
    code = f"import polars as pl; print(pl.read_parquet({json.dumps(str(manifest_path))}).group_by(\"reason\").len())"
    python = "python" if os.environ.get("VIRTUAL_ENV") else shlex.quote(sys.executable)
    return f"{python} -c {shlex.quote(code)}"


def format_summary(info: dict[str, Any], manifest_path: Path) -> str:
    """The human summary of a run: counts per stage and reason, time per stage, where the manifest is."""
    counts = info["counts"]
    config = info.get("config") or {}
    embed = (config.get("embed") or {}).get("kind", "?")
    lines = [f"winnow run '{config.get('name', Path(manifest_path).parent.name)}' — embedder: {embed}"]
    lines.append(f"  samples: {counts['samples']}   kept: {counts['kept']} ({counts['kept'] / max(counts['samples'], 1):.1%})")
    if counts.get("store_status"):
        lines.append("  store status: " + ", ".join(f"{k}={v}" for k, v in counts["store_status"].items()))
    incremental = info.get("incremental") or {}
    if incremental.get("source_changes"):
        changes = incremental["source_changes"]
        lines.append(f"  source since version {info.get('previous_version') or '-'}: "
                     + ", ".join(f"{k} {changes.get(k, 0)}" for k in ("new", "changed", "removed", "unchanged"))
                     + f"   (mode {incremental.get('mode')}{'; ' + incremental['fallback'] if incremental.get('fallback') else ''})")
    if info.get("delta"):
        lines.append(f"  version {info.get('version')} vs {info.get('previous_version') or 'none'}: "
                     + ", ".join(f"{k} {v}" for k, v in info["delta"].items()))
    if counts.get("embed_shards_skipped"):
        lines.append(f"  embed shards reused from an earlier run: {counts['embed_shards_skipped']}")
    if info.get("steps"):
        lines.append("  steps:")
        for note in info["steps"]:
            lines.append(f"    {note['scorer']:<12} dropped {note['dropped']:>7}   left {note['alive_after']:>7}")
    if counts.get("by_reason"):
        lines.append("  by reason: " + ", ".join(f"{k}={v}" for k, v in counts["by_reason"].items()))
    if info.get("timings_s"):
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
    lines.append(f"  query it: {polars_one_liner(manifest_path)}")
    return "\n".join(lines)


def format_distill_summary(info: dict[str, Any], manifest_path: Path) -> str:
    """The human summary of a distill run (run.json written by `winnow distill`)."""
    config = (info.get("config") or {}).get("distill") or {}
    counts = info.get("counts") or {}
    lines = [
        f"winnow distill '{config.get('name', Path(manifest_path).parent.name)}' — {info.get('method', config.get('method', '?'))}, "
        f"{counts.get('synthetic', '?')} synthetic samples ({counts.get('ipc', config.get('ipc', '?'))} per class)"
    ]
    for key, value in (info.get("evaluation") or {}).items():
        if isinstance(value, dict) and "mean" in value:
            lines.append(f"  {key:<12} test accuracy {100 * value['mean']:.2f} ± {100 * value.get('std', 0):.2f} (n={value.get('n', '?')})")
    if info.get("timings_s"):
        lines.append("  time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in info["timings_s"].items()))
    lines.append(f"  manifest: {manifest_path}")
    lines.append(f"  query it: {polars_one_liner(manifest_path)}")
    return "\n".join(lines)


def warn(message: str) -> None:
    print(f"winnow: warning: {message}", file=sys.stderr)


def preflight(cfg: Any) -> None:
    """Checks what can be checked before any heavy import or server start: the sources open, the step budgets fit
    together, labels that look like split names (a warning), and the embedder's weights are at hand."""
    from pipeline.config import check_step_fractions, split_like_labels
    from pipeline.sources import PrecomputedSource, source_from_config

    check_step_fractions(cfg)
    source = source_from_config(cfg.source.arguments())  # a missing root, table or shard pattern fails here, in one line
    if isinstance(source, PrecomputedSource) and source.text_emb_paths:
        source.check_text_embeddings(0)  # caption embeddings of another CLIP width: refused before any server starts
    for position, step in enumerate(cfg.steps):
        target = step.knobs().get("target")
        if isinstance(target, dict):
            try:
                source_from_config(dict(target))
            except ValueError as exc:
                raise type(exc)(f"step {position} ({step.scorer}): target: {exc}") from None
    folders = split_like_labels(cfg.source.arguments())
    if folders:
        split = next((f for f in folders if f.lower().startswith("train")), folders[0])
        warn(
            f"the folders under source.root ({', '.join(folders)}) look like split names, and would become the labels; "
            f"set source.split: {split} to read {split}/<class>/ below it (labels = class folders), "
            "or labels_from_subfolders: false for no labels"
        )
    check_weights(cfg)


def check_weights(cfg: Any) -> None:
    """The CLIP weights the config asks for are a local file or in the cache (or downloadable), before anything starts."""
    e = cfg.embed
    if e.kind != "clip":
        return
    if e.checkpoint is not None:
        if not Path(e.checkpoint).expanduser().is_file():
            raise FileNotFoundError(f"embed.checkpoint {e.checkpoint} is not a file")
        return
    if not e.pretrained or e.model.startswith(("hf-hub:", "local-dir:")):
        return
    from pipeline.embed.clip import WeightsUnavailableError, _resolve_pretrained

    try:
        _resolve_pretrained(e.model, e.pretrained, cache_dir=None, probe_timeout=5.0)
    except WeightsUnavailableError as exc:
        raise ValueError(
            f"embed.pretrained {e.pretrained!r} of embed.model {e.model!r}: {str(exc).split('. The file is')[0]}; "
            "set embed.checkpoint: /path/to/weights (a local open_clip checkpoint; README 'First run on your own images'), "
            "or embed.pretrained: null for random weights, or embed.kind: pixels"
        ) from None


def _finished_shards(cfg: Any) -> str:
    """'N of M embedding shards' finished in the run's store (for the Ctrl-C message)."""
    try:
        from pipeline.store import EmbeddingStore

        store = EmbeddingStore(cfg.store_path)
        done = len(store.done_shards())
        total = store.info().n_shards
        return f"{done} of {total} embedding shards are finished"
    except Exception:  # noqa: BLE001 - no store yet (stopped before embedding) or an unreadable one
        return "no embedding shard was finished"


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, _parse_overrides(args.set))
    preflight(cfg)
    from pipeline.reaper import start_watchdog

    start_watchdog()  # ends the temporary Prefect server and workers if this process is killed
    _quiet_prefect(args.verbose)
    from flows.curate import run_curate

    try:
        info = run_curate(cfg.model_dump(mode="json"))
    except KeyboardInterrupt:
        from flows.console import drain_prefect

        drain_prefect()
        print(
            f"\nwinnow: stopped; {_finished_shards(cfg)}. Rerun the same command to resume: finished shards are reused.",
            file=sys.stderr,
        )
        return 130
    print(format_summary(info, cfg.run_dir / "manifest.parquet"))
    return 0


def _quiet_prefect(verbose: bool) -> None:
    """Per-task state lines ("Finished in state Completed()") only with -v; warnings and errors always."""
    from flows.console import setup_console

    setup_console(verbose=verbose)


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    load_config(args.config)  # config errors in one line, before Prefect is imported
    from flows.deploy import deploy_curate

    deploy_curate(args.config, cron=args.cron, interval=args.interval, name=args.name, pool=args.pool, dry_run=args.dry_run)
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
    manifest = Path(args.run_dir) / "manifest.parquet"
    if args.json:
        print(json.dumps(info, indent=2))
    elif info.get("kind") == "distill":
        print(format_distill_summary(info, manifest))
    else:
        print(format_summary(info, manifest))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from pipeline.versions import format_changes, read_changes

    start, end, changes = read_changes(args.run_dir, from_version=args.from_version, to_version=args.to_version)
    print(format_changes(args.run_dir, start, end, changes))
    return 0


def cmd_store_compact(args: argparse.Namespace) -> int:
    from pipeline.store import EmbeddingStore

    store = EmbeddingStore(args.store)
    store.info()  # a store, readable
    result = store.compact()
    print(f"{args.store}: {result['shards_rewritten']} shard(s) rewritten, {result['rows_removed']} tombstoned row(s) "
          f"dropped, {result['files_deleted']} file(s) deleted")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from pipeline.config import load_validated

    # the config's own fields are checked before torch is imported (pipeline.distill imports it)
    from pipeline.distill import DistillConfig

    cfg = load_validated(DistillConfig, args.config, _parse_overrides(args.set))
    from pipeline.reaper import start_watchdog

    start_watchdog()
    _quiet_prefect(args.verbose)
    from flows.distill import distill

    info = distill(config=cfg.model_dump(mode="json"))
    print(format_distill_summary(info, cfg.run_dir / "manifest.parquet"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import evaluate_run, format_evaluation
    from pipeline.manifest import read_run_info

    # the run's own `evaluate:` block, then the flags given here
    base = read_run_info(args.run_dir).get("config", {}).get("evaluate") or {}
    flags = {k: v for k, v in {"sweep": args.sweep or None, "seeds": args.seeds, "probe": args.probe,
                               "holdout_fraction": args.holdout_fraction, "fractions": args.fractions,
                               "probe_iterations": args.probe_iterations}.items() if v is not None}
    result = evaluate_run(args.run_dir, EvaluateConfig.model_validate({**base, **flags}))
    print(format_evaluation(result))
    print(f"  written to {Path(args.run_dir) / 'run.json'} (key 'evaluation'); `winnow report {args.run_dir}` shows it")
    return 0


def _fractions(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


class _VersionAction(argparse.Action):
    """--version, reading the installed version only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"winnow {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="winnow",
        description="Dataset curation and data pruning: embed images, cluster them, score and prune, write a Parquet manifest.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the curate flow on a YAML config (Prefect's local server, no setup needed)")
    run.add_argument("config", help="path to the YAML config (see README 'Configuration'); relative paths in it are relative to its folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set index.k=50 or --set steps.2.keep_fraction=0.3")
    run.add_argument("-v", "--verbose", action="store_true", help="also print Prefect's per-task state lines")
    run.set_defaults(fn=cmd_run)

    deploy = sub.add_parser("deploy", help="schedule the curate flow: served by this process, or in a work pool (needs PREFECT_API_URL)")
    deploy.add_argument("config")
    when = deploy.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    deploy.add_argument("--name", default=None, help="deployment name (default: the config's name)")
    deploy.add_argument("--pool", default=None, metavar="NAME",
                        help="register in this process work pool (created if missing) for `prefect worker start --pool NAME` instead of serving")
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
    distill.add_argument("-v", "--verbose", action="store_true", help="also print Prefect's per-task state lines")
    distill.set_defaults(fn=cmd_distill)

    evaluate = sub.add_parser("evaluate", help="measure a run's selection against random subsets of the same size (probes on its embeddings)")
    evaluate.add_argument("run_dir", help="a finished run directory (its store must still exist; the source needs labels)")
    evaluate.add_argument("--sweep", action="store_true", help="also every rule at every kept fraction, and a suggested budget")
    evaluate.add_argument("--seeds", type=int, default=None, help="random subsets (and MLP seeds); default 5")
    evaluate.add_argument("--probe", choices=("linear", "mlp"), default=None, help="the proxy learner (default linear)")
    evaluate.add_argument("--holdout-fraction", type=float, default=None, help="test split by uid hash (default 0.2)")
    evaluate.add_argument("--probe-iterations", type=int, default=None,
                          help="linear probe L-BFGS iterations (default 50; README)")
    evaluate.add_argument("--fractions", type=_fractions, default=None, help="sweep kept fractions, e.g. 0.1,0.3,0.5,0.7")
    evaluate.set_defaults(fn=cmd_evaluate)

    diff = sub.add_parser("diff", help="what changed between two manifest versions of a run (counts per change and reason)")
    diff.add_argument("run_dir")
    diff.add_argument("--from", dest="from_version", type=int, default=None, help="older version (default: the one before --to)")
    diff.add_argument("--to", dest="to_version", type=int, default=None, help="newer version (default: the latest)")
    diff.set_defaults(fn=cmd_diff)

    store = sub.add_parser("store", help="maintain an embedding store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    compact = store_sub.add_parser("compact", help="rewrite the shards that hold tombstones (atomic, resumable)")
    compact.add_argument("store", help="the store directory (e.g. manifests/runs/NAME/store)")
    compact.set_defaults(fn=cmd_store_compact)

    summary = sub.add_parser("summary", help="print the summary of a finished run (curate or distill)")
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
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"winnow: error: {message}  (WINNOW_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nwinnow: stopped (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
