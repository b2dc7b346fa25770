"""The run report: one self-contained HTML file per manifest run directory.

``write_report(run_dir)`` reads ``manifest.parquet`` and ``run.json`` and writes ``report.html`` beside them:
counts per step and reason, kept fraction per class and per cluster, a histogram per score column with the cut
marked, DBP cluster complexity vs quota, SemDeDup eps vs fraction kept, and image grids (kept vs dropped samples,
the closest duplicate pairs, the hardest and easiest examples per class).

Everything is embedded: plots are matplotlib PNGs and thumbnails small PNG/JPEGs, both as ``data:`` URIs, styles
inline, no script. The page therefore opens offline and can be mailed or attached as a CI artefact.

It stays fast on million-row manifests: statistics are polars/numpy aggregations, and only the few hundred
samples shown in grids are read from the source and decoded. Sections whose data is absent (no labels, no
SemDeDup step, a source without image bytes) stay in the page with a note saying why, so their ids are stable.

Section ids: summary, counts, kept-by-class, kept-by-cluster, histograms, dbp, semdedup, evaluation, grids, duplicates,
hardest-easiest. Plots are ``<img class="plot">``, thumbnails ``<img class="thumb">``, a thumbnail that could
not be produced is ``<div class="thumb missing">``, and a section's "not available" note is ``<p class="absent">``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from manifests.schema import SCORE_PREFIX
from pipeline.atomic import atomic_write_text
from pipeline.manifest import read_manifest, read_run_info
from scorers.step import registry

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

_KEPT_COLOUR = "#2b8a3e"
_DROP_COLOUR = "#c92a2a"
_OTHER_COLOUR = "#adb5bd"
_MAX_BARS = 60  # above this many classes/clusters, bar charts become distributions


@dataclass(frozen=True)
class _Thumb:
    uid: str
    location: str | None
    label: str | None
    caption: str  # text under the image
    via: str = ""  # which source reads it: "" = the run's own, "eval<n>" = a leak step's n-th eval source


def write_report(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    *,
    grid_size: int = 24,
    pairs: int = 8,
    per_class: int = 6,
    max_classes: int = 12,
    hardness_column: str | None = None,
    thumb_px: int = 64,
    seed: int = 0,
) -> Path:
    """Writes the run's self-contained HTML report and returns its path (default ``run_dir/report.html``).

    grid_size: kept and dropped samples shown each; pairs: duplicate pairs shown per kind (exact, semantic);
    per_class / max_classes: hardest and easiest examples per class, for at most that many classes;
    hardness_column: the score column ranking difficulty (default: the first difficulty score the run's steps
        declare, in step order; see hardness_columns);
    thumb_px: longest thumbnail side; seed: for the sampled grids.
    Raises ManifestError (a ValueError) when run_dir holds no finished run, ValueError for bad knobs.
    """
    run_dir = Path(run_dir)
    for name, value, low in (("grid_size", grid_size, 0), ("pairs", pairs, 0), ("per_class", per_class, 0),
                             ("max_classes", max_classes, 1), ("thumb_px", thumb_px, 8)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    info = read_run_info(run_dir)
    frame = read_manifest(run_dir)
    if hardness_column is not None and hardness_column not in frame.columns:
        raise ValueError(f"hardness_column {hardness_column!r} is not a manifest column; score columns: {_score_columns(frame)}")
    out = Path(out_path) if out_path is not None else run_dir / REPORT_FILE

    thumbs = _ThumbReader(info.get("config", {}).get("source"), thumb_px, extra=_eval_sources(info))
    sections = [
        _summary(info, frame, run_dir),
        _counts(info, frame),
        _kept_by_class(frame),
        _kept_by_cluster(frame),
        _histograms(info, frame),
        _dbp(info),
        _semdedup(info, frame),
        _evaluation(info),
        _grids(frame, thumbs, grid_size, seed),
        _duplicates(frame, thumbs, pairs),
        _hardest_easiest(frame, thumbs, per_class, max_classes, hardness_column, hardness_columns(info.get("steps") or [])),
        _check_galleries(info, frame, thumbs, grid_size),
    ]
    title = f"winnow report — {_run_name(info, run_dir)}"
    page = _PAGE.format(title=_e(title), css=_CSS, body="\n".join(sections))
    atomic_write_text(out, page)
    return out


# ---- sections --------------------------------------------------------------------------------------------------


def _run_name(info: dict[str, Any], run_dir: Path) -> str:
    """The run's name: a curate config's `name`, a distill run's `config.distill.name`, else the folder's name."""
    cfg = info.get("config") or {}
    return str(cfg.get("name") or (cfg.get("distill") or {}).get("name") or run_dir.name)


def _distill_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """A distill run's method, real data and test accuracies (synthetic vs random real subsets of the same size)."""
    data = info.get("data") or {}
    rows = [("method", str(info.get("method", "?"))),
            ("real data", ", ".join(f"{k} {v}" for k, v in data.items() if k in ("kind", "name", "root", "pool", "test")))]
    for key, label in (("synthetic", "synthetic set"), ("random_real", "random real subset")):
        ev = (info.get("evaluation") or {}).get(key)
        if isinstance(ev, dict) and "mean" in ev:
            rows.append((f"test accuracy, {label}", f"{100 * ev['mean']:.2f}% ± {100 * ev.get('std', 0):.2f} (n={ev.get('n', '?')})"))
    return rows


def _summary(info: dict[str, Any], frame: pl.DataFrame, run_dir: Path) -> str:
    cfg = info.get("config", {})
    n = frame.height
    kept = int(frame["keep"].sum())
    embed = cfg.get("embed", {})
    embedder = str(embed.get("kind", "?"))
    if embed.get("kind") == "clip":
        embedder += f" {embed.get('model')} ({embed.get('checkpoint') or embed.get('pretrained')})"
    distill = info.get("kind") == "distill"
    rows = [
        ("run", _run_name(info, run_dir)),
        ("run directory", str(run_dir)),
        *(_distill_rows(info) if distill else [("source", cfg.get("source", {}).get("kind", "?")), ("embedder", embedder)]),
        ("samples", f"{n:,}"),
        ("kept", f"{kept:,} ({_pct(kept, n)})"),
        ("finished", info.get("finished_at", "?")),
    ]
    timings = info.get("timings_s") or {}
    if timings:
        rows.append(("time per stage", ", ".join(f"{k} {float(v):.2f}s" for k, v in timings.items())))
    status = (info.get("counts") or {}).get("store_status")
    if status:
        rows.append(("store status", ", ".join(f"{k}={v:,}" for k, v in status.items())))
    config_text = json.dumps(cfg, indent=2, sort_keys=True)
    body = _table(["", ""], rows, header=False) + f"<details><summary>config</summary><pre>{_e(config_text)}</pre></details>"
    return _section("summary", "Summary", body)


def _counts(info: dict[str, Any], frame: pl.DataFrame) -> str:
    steps = info.get("steps") or []
    n = frame.height
    parts = []
    if steps:
        rows = [
            (i, s.get("scorer", "?"), _knobs(s.get("knobs")), f"{int(s.get('dropped', 0)):,}",
             f"{int(s.get('alive_after', 0)):,}")
            for i, s in enumerate(steps)
        ]
        parts.append("<h3>Per step (in order)</h3>" + _table(["#", "scorer", "knobs", "dropped", "left after"], rows))
    reasons = frame.group_by("reason").len().sort("len", descending=True)
    reason_rows = [("kept" if r is None else r, f"{c:,}", _pct(c, n)) for r, c in reasons.iter_rows()]
    parts.append("<h3>By reason</h3>" + _table(["reason", "rows", "share"], reason_rows))
    names = ["kept" if r is None else r for r in reasons["reason"].to_list()]
    counts = reasons["len"].to_numpy()
    fig, ax = _figure(6.0, 0.35 * len(names) + 1.0)
    colours = [_KEPT_COLOUR if name == "kept" else _DROP_COLOUR for name in names]
    ax.barh(names[::-1], counts[::-1], color=colours[::-1])
    ax.set_xlabel("rows")
    ax.set_title("rows by reason")
    parts.append(_plot(fig, "rows by reason"))
    return _section("counts", "Counts per step and reason", "".join(parts))


def _kept_by_class(frame: pl.DataFrame) -> str:
    if "label" not in frame.columns or frame["label"].null_count() == frame.height:
        return _section("kept-by-class", "Kept fraction per class", _absent("the source has no labels"))
    stats = _kept_fraction(frame.filter(pl.col("label").is_not_null()), "label")
    return _section("kept-by-class", "Kept fraction per class", _fraction_body(stats, "label", "class"))


def _kept_by_cluster(frame: pl.DataFrame) -> str:
    clustered = frame.filter(pl.col("cluster") >= 0)
    if clustered.height == 0:
        return _section("kept-by-cluster", "Kept fraction per cluster", _absent("no row has a concept cluster"))
    stats = _kept_fraction(clustered, "cluster")
    return _section("kept-by-cluster", "Kept fraction per cluster", _fraction_body(stats, "cluster", "cluster"))


def _kept_fraction(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return (
        frame.group_by(key)
        .agg(pl.len().alias("size"), pl.col("keep").sum().alias("kept"))
        .with_columns((pl.col("kept") / pl.col("size")).alias("fraction"))
        .sort(key)
    )


def _fraction_body(stats: pl.DataFrame, key: str, noun: str) -> str:
    keys = [str(k) for k in stats[key].to_list()]
    frac = stats["fraction"].to_numpy()
    size = stats["size"].to_numpy()
    if len(keys) <= _MAX_BARS:
        fig, ax = _figure(max(6.0, 0.22 * len(keys) + 1.5), 3.2)
        ax.bar(range(len(keys)), frac, color=_KEPT_COLOUR)
        ax.set_xticks(range(len(keys)), keys, rotation=90 if len(keys) > 12 else 0, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_xlabel(noun)
        ax.set_ylabel("fraction kept")
        ax.set_title(f"fraction kept per {noun}")
        plot = _plot(fig, f"fraction kept per {noun}")
        rows = [(k, f"{s:,}", f"{int(kp):,}", f"{f:.1%}") for k, s, kp, f in zip(keys, size, stats["kept"].to_numpy(), frac)]
        return plot + _table([noun, "rows", "kept", "fraction"], rows)
    # Too many to label one by one: the fraction against size shows whether pruning favours small or large groups.
    fig, ax = _figure(6.0, 3.4)
    ax.scatter(size, frac, s=6, alpha=0.5, color=_KEPT_COLOUR, rasterized=True)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"{noun} size (rows)")
    ax.set_ylabel("fraction kept")
    ax.set_title(f"fraction kept per {noun} ({len(keys):,} {noun}s)")
    order = np.argsort(frac, kind="stable")
    pick = list(order[:10]) + list(order[-10:][::-1])
    rows = [(keys[i], f"{size[i]:,}", f"{frac[i]:.1%}") for i in pick]
    return _plot(fig, f"fraction kept per {noun}") + f"<p>The 10 {noun}s kept least, then the 10 kept most.</p>" + _table(
        [noun, "rows", "fraction"], rows
    )


def _unscored(name: str, keep: np.ndarray, finite: np.ndarray, reason: np.ndarray, own: str | None) -> str:
    """For the kept group of a histogram's legend: how many kept rows have no score (not drawn), so the legend's
    count reads against the run's kept count (e.g. SemDeDup's first row of each cluster before scores were -1)."""
    if name != "kept":
        return ""
    missing = int((keep & ~finite).sum())
    return f", {missing:,} kept rows without a score not drawn" if missing else ""


def _histograms(info: dict[str, Any], frame: pl.DataFrame) -> str:
    cols = _score_columns(frame)
    if not cols:
        return _section("histograms", "Score histograms", _absent("no scorer wrote a score column"))
    steps = info.get("steps") or []
    reasons = _step_reasons(steps)
    orientation = info.get("orientation") or {}
    parts = []
    reason = frame["reason"].to_numpy()
    keep = frame["keep"].to_numpy()
    for col in cols:
        pos = _step_for_column(col, steps)
        values = frame[col].to_numpy()
        finite = np.isfinite(values)
        if not finite.any():
            parts.append(f"<h3>{_e(col)}</h3>" + _absent("no finite values"))
            continue
        own = reasons[pos] if pos is not None else None
        dropped_here = (reason == own) if own is not None else np.zeros(len(values), dtype=bool)
        cut, how = _cut(col, pos, steps, reasons, values, reason)
        lo, hi = float(values[finite].min()), float(values[finite].max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 51)
        dropped_name = f"dropped by {steps[pos]['scorer']}" if pos is not None else "dropped"
        groups = [
            ("kept", keep & finite, _KEPT_COLOUR),
            (dropped_name, ~keep & finite & (dropped_here if own is not None else True), _DROP_COLOUR),
        ]
        if own is not None:
            groups.append(("dropped by another step", ~keep & finite & ~dropped_here, _OTHER_COLOUR))
        fig, ax = _figure(6.4, 3.2)
        bottom = np.zeros(len(bins) - 1)
        for name, mask, colour in groups:
            counts, _ = np.histogram(values[mask], bins=bins)
            if counts.sum():
                # Stacked filled steps: one artist per group (bars would be one patch per bin, slow to draw).
                label = f"{name} ({int(mask.sum()):,})" + _unscored(name, keep, finite, reason, own)
                ax.stairs(bottom + counts, bins, baseline=bottom.copy(), fill=True, color=colour, label=label)
                bottom = bottom + counts
        if cut is not None:
            ax.axvline(cut, color="black", linestyle="--", linewidth=1.2, label=f"cut {cut:.4g}")
        ax.set_xlabel(col)
        ax.set_ylabel("rows")
        ax.set_title(col)
        ax.legend(fontsize=7)
        step_name = steps[pos]["scorer"] if pos is not None else None
        note = orientation.get(step_name, "") if step_name else ""
        text = f"<p class='note'>{_e(note)}</p>" if note else ""
        text += f"<p class='note'>cut: {_e(how)}</p>"
        plot = _plot(fig, f"histogram of {col}")
        parts.append(f"<div class='hist' data-column='{_e(col)}'><h3>{_e(col)}</h3>{plot}{text}</div>")
    return _section("histograms", "Score histograms", "".join(parts))


def _cut(col: str, pos: int | None, steps: list[dict[str, Any]], reasons: list[str], values: np.ndarray,
         reason: np.ndarray) -> tuple[float | None, str]:
    """The score value separating the rows a step dropped from those that passed it, when one exists.

    SemDeDup states its cut (max similarity > 1 - eps). Otherwise a cut is reported only when the rows the step
    dropped and the rows it let through do not overlap on the score; per-class or per-cluster selections
    (class-balanced budgets, DBP quotas) have no single threshold and say so.
    """
    if pos is None:
        return None, "no step of this run selects on this column"
    step = steps[pos]
    if step.get("scorer") == "semdedup" and step.get("eps") is not None:
        eps = float(step["eps"])
        return 1.0 - eps, f"drops max similarity > 1 − ε = {1 - eps:.4g} (ε = {eps:g})"
    own = reasons[pos]
    later = set(reasons[pos + 1:]) - {own}
    finite = np.isfinite(values)
    dropped = finite & (reason == own)
    passed = finite & (np.equal(reason, None) | np.isin(reason, list(later)))
    if not dropped.any():
        return None, f"{step.get('scorer')} dropped no rows"
    if not passed.any():
        return None, f"{step.get('scorer')} dropped every scored row"
    d, p = values[dropped], values[passed]
    if d.max() < p.min():
        cut = float((d.max() + p.min()) / 2)
        return cut, f"drops scores below {cut:.4g}"
    if d.min() > p.max():
        cut = float((d.min() + p.max()) / 2)
        return cut, f"drops scores above {cut:.4g}"
    return None, "no single threshold: the step selects within each class or cluster"


def _dbp(info: dict[str, Any]) -> str:
    note = next((s for s in info.get("steps") or [] if s.get("scorer") == "dbp" and s.get("quotas")), None)
    if note is None:
        return _section("dbp", "DBP: cluster complexity vs quota", _absent("no DBP step in this run"))
    q = note["quotas"]
    complexity = np.array([r["complexity"] for r in q], dtype=float)
    quota = np.array([r["quota"] for r in q], dtype=float)
    size = np.array([r["size"] for r in q], dtype=float)
    fig, (ax1, ax2) = _figure(9.0, 3.4, ncols=2)
    area = 8 + 60 * size / max(size.max(), 1)
    ax1.scatter(complexity, quota, s=area, alpha=0.6, color="#1971c2", rasterized=len(q) > 2000)
    ax1.set_xlabel("complexity d_inter·d_intra")
    ax1.set_ylabel("quota (rows kept)")
    ax1.set_title("quota vs complexity (marker area ∝ size)")
    with np.errstate(divide="ignore", invalid="ignore"):
        kept_frac = np.where(size > 0, quota / size, np.nan)
    ax2.scatter(complexity, kept_frac, s=10, alpha=0.6, color="#1971c2", rasterized=len(q) > 2000)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("complexity d_inter·d_intra")
    ax2.set_ylabel("quota / cluster size")
    ax2.set_title("fraction of the cluster kept")
    budget = int(note.get("budget", quota.sum()))
    meta = f"<p>{len(q):,} clusters, budget {budget:,}, temperature {note.get('temperature', '?')}.</p>"
    return _section("dbp", "DBP: cluster complexity vs quota", meta + _plot(fig, "DBP complexity vs quota"))


def _evaluation(info: dict[str, Any]) -> str:
    """`winnow evaluate`: probe accuracy vs kept fraction, the selection against random's 95% band."""
    title = "Evaluation: selection vs random"
    ev = info.get("evaluation")
    if info.get("kind") == "distill":  # its own evaluation (synthetic vs random real) is in the summary
        return _section("evaluation", title, _absent("a distilled set: its test accuracies are in the summary above"))
    if not ev:
        return _section("evaluation", title, _absent("not evaluated (run `winnow evaluate RUN_DIR`, or add `evaluate:`)"))
    s = ev["selection_vs_random"]
    fig, ax = _figure(6.0, 3.4)
    sw = ev.get("sweep")
    if sw:
        xs = [100 * float(f) for f in sw["table"]]
        rnd = [sw["table"][f]["random"] for f in sw["table"]]
        ax.fill_between(xs, [100 * r["ci"][0] for r in rnd], [100 * r["ci"][1] for r in rnd], color=_OTHER_COLOUR,
                        alpha=0.5, label="random (95% CI)")
        for rule in sw["rules"]:
            if rule != "random":
                ax.plot(xs, [100 * sw["table"][f][rule]["accuracy"] for f in sw["table"]], marker="o", ms=3, label=rule)
        ax.axhline(100 * sw["full"]["accuracy"], color="black", ls=":", label="full pool")
    x0 = 100 * s["kept_fraction_of_pool"]
    ax.errorbar([x0], [100 * s["random"]["accuracy"]], yerr=[[100 * (s["random"]["accuracy"] - s["random"]["ci"][0])],
                [100 * (s["random"]["ci"][1] - s["random"]["accuracy"])]], color="grey", capsize=3, marker="s",
                label="random, this budget")
    ax.errorbar([x0], [100 * s["selection"]["accuracy"]], yerr=[[100 * (s["selection"]["accuracy"] - s["selection"]["ci"][0])],
                [100 * (s["selection"]["ci"][1] - s["selection"]["accuracy"])]], color=_KEPT_COLOUR, capsize=3,
                marker="D", label="this run's selection")
    ax.set_xlabel("kept fraction of the pool (%)")
    ax.set_ylabel("probe test accuracy (%)")
    ax.legend(fontsize=7)
    rows = [["selection", f"{100 * s['selection']['accuracy']:.2f}", f"{100 * s['selection']['ci'][0]:.2f}–{100 * s['selection']['ci'][1]:.2f}"],
            ["random (same size)", f"{100 * s['random']['accuracy']:.2f}", f"{100 * s['random']['ci'][0]:.2f}–{100 * s['random']['ci'][1]:.2f}"]]
    if "full" in s:
        rows.append(["full pool", f"{100 * s['full']['accuracy']:.2f}", f"{100 * s['full']['ci'][0]:.2f}–{100 * s['full']['ci'][1]:.2f}"])
    body = (f"<p>{_e(s['probe']['kind'])} probe on the run's embeddings, test split: {_e(ev['split']['kind'])} "
            f"({s['n_test']:,} rows). Selection − random: {100 * s['difference']:+.2f} pp "
            f"(95% CI {100 * s['difference_ci'][0]:+.2f} to {100 * s['difference_ci'][1]:+.2f}), p = {s['p_value']:.3g}: "
            f"<b>{_e(s['verdict'])}</b>.</p>" + _table(["trained on", "accuracy %", "95% CI"], rows))
    if sw:
        budget = sw["suggested_budget"]
        body += (f"<p>Sweep: best rule per kept fraction " + ", ".join(f"{100 * float(f):g}%: {_e(b['rule'])}" for f, b in sw["best"].items())
                 + f"; suggested budget: {'none' if budget is None else f'{100 * budget:g}% kept'} (within "
                 f"{100 * sw['tolerance']:g} pp of the full pool).</p>")
    return _section("evaluation", title, body + _plot(fig, "probe accuracy vs kept fraction"))


def _semdedup(info: dict[str, Any], frame: pl.DataFrame) -> str:
    note = next((s for s in info.get("steps") or [] if s.get("scorer") == "semdedup"), None)
    if note is None:
        return _section("semdedup", "SemDeDup: ε vs fraction kept", _absent("no SemDeDup step in this run"))
    entering = int(note.get("entering") or 0)
    grid = {float(k): int(v) for k, v in (note.get("kept_by_eps") or {}).items()}
    eps = note.get("eps")
    fig, ax = _figure(6.0, 3.2)
    if entering and "score_semdedup" in frame.columns:
        # The score is each row's max similarity; NaN rows (first of their cluster, or not entering) are never
        # duplicates, so the kept count at any ε is entering − #(score > 1 − ε): a dense curve, exact.
        sims = frame["score_semdedup"].to_numpy()
        sims = np.sort(sims[np.isfinite(sims)].astype(np.float64))
        hi = max([0.2, *grid.keys(), float(eps or 0) * 2])
        dense = np.linspace(0.0, hi, 200)
        dups = len(sims) - np.searchsorted(sims, 1.0 - dense, side="right")
        ax.plot(dense, (entering - dups) / entering, color="#1971c2", label="from score_semdedup")
    if entering and grid:
        xs = sorted(grid)
        ax.plot(xs, [grid[x] / entering for x in xs], "o", color="black", label="kept_by_eps (run.json)")
    if eps is not None:
        ax.axvline(float(eps), color=_DROP_COLOUR, linestyle="--", label=f"chosen ε = {float(eps):g}")
    ax.set_xlabel("ε (duplicate when cosine similarity > 1 − ε)")
    ax.set_ylabel("fraction of entering rows kept")
    ax.set_title("SemDeDup ε vs fraction kept")
    ax.legend(fontsize=7)
    rows = [(f"{k:g}", f"{v:,}", _pct(v, entering)) for k, v in sorted(grid.items())]
    table = _table(["ε", "kept", "fraction"], rows) if rows else ""
    meta = f"<p>{entering:,} rows entered SemDeDup; chosen ε = {eps}.</p>"
    return _section("semdedup", "SemDeDup: ε vs fraction kept", meta + _plot(fig, "SemDeDup eps vs fraction kept") + table)


def _grids(frame: pl.DataFrame, thumbs: _ThumbReader, grid_size: int, seed: int) -> str:
    if thumbs.unavailable:
        return _section("grids", "Kept vs dropped samples", _absent(thumbs.unavailable))
    kept = _sample(frame.filter(pl.col("keep")), grid_size, seed)
    dropped = _sample(frame.filter(~pl.col("keep")), grid_size, seed)
    kept_items = [_Thumb(u, loc, lab, _caption(u, lab)) for u, loc, lab in _rows(kept)]
    dropped_items = [
        _Thumb(u, loc, lab, _caption(u, lab, r)) for (u, loc, lab), r in zip(_rows(dropped), dropped["reason"].to_list())
    ]
    thumbs.prefetch(kept_items + dropped_items)
    kept_html = "".join(thumbs.html(t) for t in kept_items) or _absent("nothing kept")
    dropped_html = "".join(thumbs.html(t) for t in dropped_items) or _absent("nothing dropped")
    body = (
        f"<div class='pair-grid'><div><h3>kept (random {len(kept_items)} of {int(frame['keep'].sum()):,})</h3>"
        f"<div class='grid kept'>{kept_html}</div></div>"
        f"<div><h3>dropped (random {len(dropped_items)} of {int((~frame['keep']).sum()):,})</h3>"
        f"<div class='grid dropped'>{dropped_html}</div></div></div>"
    )
    return _section("grids", "Kept vs dropped samples", body)


def _duplicates(frame: pl.DataFrame, thumbs: _ThumbReader, pairs: int) -> str:
    if "dup_of" not in frame.columns or frame["dup_of"].null_count() == frame.height:
        return _section("duplicates", "Top duplicate pairs", _absent("no row was marked as a duplicate"))
    if thumbs.unavailable:
        return _section("duplicates", "Top duplicate pairs", _absent(thumbs.unavailable))
    cols = ["uid", "location", "label"]
    originals = frame.select([pl.col(c).alias(f"orig_{c}") for c in cols if c in frame.columns])
    dups = frame.filter(pl.col("dup_of").is_not_null())
    parts = []
    kinds = [("exact_dup", "exact duplicates (same bytes)", None)]
    sem_col = "score_semdedup" if "score_semdedup" in frame.columns else None
    kinds.append(("semdedup", "semantic duplicates, most similar first", sem_col))
    seen_reasons = set(dups["reason"].unique().to_list())
    kinds += [(r, f"duplicates ({r})", None) for r in sorted(x for x in seen_reasons if x and x not in ("exact_dup", "semdedup"))]
    for reason, title, sim_col in kinds:
        sub = dups.filter(pl.col("reason") == reason)
        if sub.height == 0:
            continue
        total = sub.height
        # top_k/bottom_k instead of a full sort: a big run can have hundreds of thousands of duplicates.
        if sim_col:
            sub = sub.with_columns(pl.col(sim_col).fill_nan(None)).top_k(pairs, by=sim_col)
            sub = sub.sort(sim_col, descending=True, nulls_last=True)
        else:
            sub = sub.bottom_k(pairs, by="uid").sort("uid")
        if reason == "leak":  # dup_of is an eval row's uid: its image is read through the eval source
            found = thumbs.find_eval(sub["dup_of"].to_list())
            sub = sub.with_columns(
                pl.Series("orig_location", [found.get(u, (None, None, ""))[0] for u in sub["dup_of"]], dtype=pl.String),
                pl.Series("orig_label", [found.get(u, (None, None, ""))[1] for u in sub["dup_of"]], dtype=pl.String),
                pl.Series("orig_via", [found.get(u, (None, None, ""))[2] for u in sub["dup_of"]], dtype=pl.String),
            )
        else:
            sub = sub.join(originals, left_on="dup_of", right_on="orig_uid", how="left", maintain_order="left")
        items = []
        for row in sub.iter_rows(named=True):
            value = row.get(sim_col) if sim_col else None
            sim = f" · sim {value:.4f}" if value is not None and math.isfinite(value) else ""
            dup_caption = _caption(row["uid"], row.get("label"), "dropped") + sim
            dup = _Thumb(row["uid"], row.get("location"), row.get("label"), dup_caption)
            orig_caption = _caption(row["dup_of"], row.get("orig_label"), "eval" if reason == "leak" else "original")
            orig = _Thumb(row["dup_of"], row.get("orig_location"), row.get("orig_label"), orig_caption, row.get("orig_via") or "")
            items.append((orig, dup))
        thumbs.prefetch([t for pair in items for t in pair])
        rows = "".join(f"<div class='dup-pair'>{thumbs.html(o)}{thumbs.html(d)}</div>" for o, d in items)
        parts.append(f"<h3>{_e(title)} — {len(items)} of {total:,}</h3>"
                     f"<div class='grid pairs' data-reason='{_e(reason)}'>{rows}</div>")
    if not parts:
        return _section("duplicates", "Top duplicate pairs", _absent("no duplicate pairs"))
    return _section("duplicates", "Top duplicate pairs", "".join(parts))


def _hardest_easiest(frame: pl.DataFrame, thumbs: _ThumbReader, per_class: int, max_classes: int, column: str | None,
                     hardness: dict[str, int]) -> str:
    title = "Hardest and easiest per class"
    if column is None:
        column = next((c for c in hardness if c in frame.columns and frame[c].is_not_nan().any()), None)
    if column is None:
        known = sorted({s.name for spec in registry().values() for s in spec.scores if s.hardness})
        why = f"no difficulty score in this run (one of {', '.join(known)})"
        return _section("hardest-easiest", title, _absent(why))
    if thumbs.unavailable:
        return _section("hardest-easiest", title, _absent(thumbs.unavailable))
    if per_class == 0:  # also: polars' group_by().head(0) yields a null row per group, not nothing
        return _section("hardest-easiest", title, _absent("per_class = 0"))
    sign = hardness.get(column, 1)
    has_labels = "label" in frame.columns and frame["label"].null_count() < frame.height
    wanted = [c for c in ("uid", "location", "label", "keep", "reason", column) if c in frame.columns]
    scored = frame.select(wanted).filter(pl.col(column).is_not_null() & pl.col(column).is_finite())
    if has_labels:
        scored = scored.filter(pl.col("label").is_not_null())
        classes = scored["label"].unique().sort()
    else:
        scored = scored.with_columns(pl.lit("all samples").alias("label"))
        classes = pl.Series(["all samples"])
    n_classes = len(classes)
    classes = classes.head(max_classes)
    scored = scored.filter(pl.col("label").is_in(classes.implode())).with_columns((pl.col(column) * sign).alias("_hard"))
    hardest = scored.sort("_hard", descending=True).group_by("label", maintain_order=True).head(per_class)
    easiest = scored.sort("_hard").group_by("label", maintain_order=True).head(per_class)

    def items(sub: pl.DataFrame, label: str) -> list[_Thumb]:
        sub = sub.filter(pl.col("label") == label)
        return [
            _Thumb(r["uid"], r.get("location"), r["label"] if has_labels else None,
                   f"{_caption(r['uid'], None, None if r['keep'] else r['reason'])} · {r[column]:.3g}")
            for r in sub.iter_rows(named=True)
        ]

    rows_html = []
    per = [(str(c), items(hardest, c), items(easiest, c)) for c in classes.to_list()]
    thumbs.prefetch([t for _, h, e in per for t in h + e])
    for label, hard, easy in per:
        hard_html = "".join(thumbs.html(t) for t in hard)
        easy_html = "".join(thumbs.html(t) for t in easy)
        rows_html.append(
            f"<div class='class-row' data-label='{_e(label)}'><h4>{_e(label)}</h4>"
            f"<div class='he'><span class='he-title'>hardest</span><div class='grid hardest'>{hard_html}</div></div>"
            f"<div class='he'><span class='he-title'>easiest</span><div class='grid easiest'>{easy_html}</div></div></div>"
        )
    direction = "larger = harder" if sign > 0 else "smaller = harder"
    shown = f"showing {len(per)} of {n_classes:,} classes" if has_labels else "no labels: over all samples"
    meta = f"<p>Ranked by <code>{_e(column)}</code> ({direction}); {shown}. Captions show the drop reason if dropped.</p>"
    return _section("hardest-easiest", title, meta + "".join(rows_html))


# reason → (score column ranking the gallery, worst first when descending, what the caption adds)
_CHECK_GALLERIES: dict[str, tuple[str | None, bool]] = {
    "low_quality": ("score_quality_blur", False),
    "outlier": ("score_outlier", True),
    "label_issue": ("score_label_quality", False),
    "label_mismatch": ("score_label_rank", True),
    "clip_score": ("score_clip", False),
    "leak": ("score_leak", True),
    "head": (None, False),
}


def _check_galleries(info: dict[str, Any], frame: pl.DataFrame, thumbs: _ThumbReader, n: int) -> str:
    """One gallery per basic-check reason (worst first, with the failed check, given → suggested label, the caption,
    the eval uid a leak copies), and for each step that cut at a threshold the rows just inside and just outside it."""
    title = "Basic checks: galleries per reason"
    present = [r for r in _CHECK_GALLERIES if (frame["reason"] == r).any()]
    if not present:
        return _section("check-galleries", title, _absent("no quality / outlier / leak / label / CLIP / head step dropped a row"))
    if thumbs.unavailable:
        return _section("check-galleries", title, _absent(thumbs.unavailable))
    parts = []
    for reason in present:
        column, descending = _CHECK_GALLERIES[reason]
        sub = frame.filter(pl.col("reason") == reason)
        total = sub.height
        if column is None:  # head: the step's own score column
            step = next((s for s in info.get("steps", []) if s.get("scorer") == "head"), {})
            column = f"score_{step.get('knobs', {}).get('name', '')}"
        if column in sub.columns:
            sub = sub.with_columns(pl.col(column).fill_nan(None)).sort(column, descending=descending, nulls_last=True)
        sub = sub.head(n)
        items = [_Thumb(r["uid"], r.get("location"), r.get("label"), _check_caption(r, column)) for r in sub.iter_rows(named=True)]
        thumbs.prefetch(items)
        parts.append(f"<h3>{_e(reason)} — {len(items)} of {total:,}</h3>"
                     f"<div class='grid check' data-reason='{_e(reason)}'>{''.join(thumbs.html(t) for t in items)}</div>")
    for step in info.get("steps", []):
        threshold = step.get("threshold")
        column = {"outlier": "score_outlier", "clip_score": "score_clip"}.get(step.get("scorer", ""))
        if step.get("scorer") == "outlier" and step.get("score") == "density_ratio":
            column = "score_outlier_density"
        if step.get("scorer") == "head":
            column = f"score_{step.get('knobs', {}).get('name', '')}"
        if threshold is None or column is None or column not in frame.columns or not math.isfinite(threshold):
            continue
        scored = frame.filter(pl.col(column).is_not_null() & pl.col(column).is_finite())
        below = scored.filter(pl.col(column) < threshold).sort(column, descending=True).head(n // 2)
        above = scored.filter(pl.col(column) >= threshold).sort(column).head(n // 2)
        band = [_Thumb(r["uid"], r.get("location"), r.get("label"), _check_caption(r, column)) for r in
                list(below.iter_rows(named=True))[::-1] + list(above.iter_rows(named=True))]
        thumbs.prefetch(band)
        parts.append(f"<h3>{_e(step['scorer'])}: rows around its threshold {threshold:.4g} on {_e(column)} "
                     f"(left: below, right: at or above)</h3>"
                     f"<div class='grid band' data-step='{_e(step['scorer'])}'>{''.join(thumbs.html(t) for t in band)}</div>")
    return _section("check-galleries", title, "".join(parts))


def _check_caption(row: dict[str, Any], column: str | None) -> str:
    bits = [_caption(row["uid"], row.get("label"), row.get("reason"))]
    if row.get("quality_issue"):
        bits.append(row["quality_issue"])
    if row.get("suggested_label"):
        bits.append(f"{row.get('label')} → {row['suggested_label']}")
    if row.get("reason") == "leak" and row.get("dup_of"):
        bits.append(f"copies eval {row['dup_of']}")
    if row.get("caption"):
        text = row["caption"]
        bits.append(f"“{text if len(text) <= 60 else text[:59] + '…'}”")
    value = row.get(column) if column else None
    if isinstance(value, float) and math.isfinite(value):
        bits.append(f"{column.removeprefix('score_')} {value:.3g}")
    return " · ".join(bits)


# ---- thumbnails ------------------------------------------------------------------------------------------------


def _eval_sources(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct eval sources of the run's leak steps, in step order (run.json's config)."""
    specs: dict[str, dict[str, Any]] = {}
    for step in (info.get("config") or {}).get("steps") or []:
        if isinstance(step, dict) and step.get("scorer") == "leak":
            for spec in step.get("eval_sources") or []:
                if isinstance(spec, dict):
                    specs.setdefault(json.dumps(spec, sort_keys=True, default=str), spec)
    return list(specs.values())


class _ThumbReader:
    """Reads, decodes and shrinks the few images a report shows, through the run's own source or (leak pairs) the
    leak step's eval sources; caches by (source, uid)."""

    def __init__(self, source_cfg: dict[str, Any] | None, px: int, workers: int = 8,
                 extra: Sequence[dict[str, Any]] = ()):
        self.px = px
        self.workers = workers
        self.source = None
        self.unavailable: str | None = None
        self._cache: dict[tuple[str, str], str | None] = {}
        self._extra_cfgs = {f"eval{i}": dict(spec) for i, spec in enumerate(extra)}
        self._extra: dict[str, Any] = {}  # opened on first use: listing an eval source costs a scan
        if not source_cfg:
            self.unavailable = "run.json has no source config: images cannot be read"
        elif source_cfg.get("kind") == "precomputed":
            self.unavailable = "the source is precomputed embeddings: there are no images to show"
        else:
            from pipeline.sources import source_from_config

            try:
                self.source = source_from_config(source_cfg)
            except Exception as exc:  # moved or deleted dataset: the rest of the report is still useful
                self.unavailable = f"the run's source cannot be opened ({exc})"

    def find_eval(self, uids: Sequence[str]) -> dict[str, tuple[str | None, str | None, str]]:
        """uid → (location, label, via) of the eval rows with these uids: the first eval source (in step order) listing
        each. An eval source that cannot be opened or listed is skipped (its rows show as missing thumbnails)."""
        from pipeline.sources import source_from_config

        wanted, found = set(uids), {}
        for via, spec in self._extra_cfgs.items():
            if not wanted - set(found):
                break
            try:
                source = self._extra[via] if via in self._extra else source_from_config(spec)
                # precomputed embeddings: no image to show
                refs = source.refs() if getattr(source, "has_images", True) else []
            except Exception as exc:  # moved or deleted eval set: the rest of the report is still useful
                log.warning("report: cannot list eval source %s: %s", spec, exc)
                source, refs = None, []
            self._extra[via] = source
            if len(refs):  # only the rows asked for become SampleRefs
                rows = np.flatnonzero(refs.uids().is_in(sorted(wanted - set(found))).to_numpy())
                for ref in refs.take(rows):
                    found[ref.uid] = (ref.location, ref.label, via)
            if source is not None:
                source.forget_refs()  # the listing was needed for a few uids only
        return found

    def prefetch(self, items: Sequence[_Thumb]) -> None:
        todo = {(t.via, t.uid): t for t in items if (t.via, t.uid) not in self._cache}
        if not todo:
            return
        # Reads are I/O bound (files, tar members, object stores); decoding releases the GIL in Pillow.
        with ThreadPoolExecutor(max_workers=min(self.workers, len(todo))) as pool:
            for key, uri in zip(todo, pool.map(self._load, todo.values())):
                self._cache[key] = uri

    def html(self, t: _Thumb) -> str:
        if (t.via, t.uid) not in self._cache:
            self._cache[(t.via, t.uid)] = self._load(t)
        uri = self._cache[(t.via, t.uid)]
        caption = f"<figcaption>{_e(t.caption)}</figcaption>"
        if uri is None:
            return f"<figure><div class='thumb missing' title='{_e(t.uid)}'>no image</div>{caption}</figure>"
        return f"<figure><img class='thumb' src='{uri}' alt='{_e(t.uid)}' title='{_e(t.uid)}'>{caption}</figure>"

    def _load(self, t: _Thumb) -> str | None:
        source = self._extra.get(t.via) if t.via else self.source
        if source is None or not t.location:
            return None
        from pipeline.decode import decode_image
        from pipeline.sources import SampleRef

        try:
            data = source.read_bytes(SampleRef(t.uid, t.location, t.label))
        except Exception as exc:
            log.warning("report: cannot read %s (%s): %s", t.uid, t.location, exc)
            return None
        decoded = decode_image(data, max_side=max(self.px * 8, 256), cover=self.px)  # no larger than the thumbnail needs
        if decoded.image is None:
            return None
        return _thumb_uri(decoded.image, self.px)


def _thumb_uri(image: Any, px: int) -> str:
    """A data URI of the image shrunk to at most px on its longest side: PNG or JPEG, whichever is smaller."""
    from PIL import Image

    im = image.copy()
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    best: tuple[int, str, bytes] | None = None
    for fmt, mime, kwargs in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 82})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kwargs)
        data = buf.getvalue()
        if best is None or len(data) < best[0]:
            best = (len(data), mime, data)
    assert best is not None
    return f"data:{best[1]};base64,{base64.b64encode(best[2]).decode('ascii')}"


# ---- helpers ---------------------------------------------------------------------------------------------------


def _score_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(SCORE_PREFIX)]


def hardness_columns(steps: list[dict[str, Any]]) -> dict[str, int]:
    """The score columns that rank examples by difficulty, with the sign that makes larger = harder: what the run's
    steps (run.json's notes, in order) declare in the step registry."""
    specs = registry()
    out: dict[str, int] = {}
    for note in steps:
        spec = specs.get(str(note.get("scorer")))
        for score in spec.scores if spec is not None else ():
            if score.hardness and score.name not in out:
                out[score.name] = score.hardness
    return out


def _step_reasons(steps: list[dict[str, Any]]) -> list[str]:
    """The manifest reason each step's drops carry, from the step registry: "" for a step that never drops (matches
    no row), the scorer name if unregistered."""
    specs = registry()
    return [(specs[s["scorer"]].reason or "") if s.get("scorer") in specs else str(s.get("scorer")) for s in steps]


def _step_for_column(col: str, steps: list[dict[str, Any]]) -> int | None:
    """Index of the step that wrote score column `col`: the last step declaring it in the registry, else by name
    (score_<scorer> or score_<scorer>_<detail>)."""
    specs = registry()
    declared = [i for i, s in enumerate(steps) if s.get("scorer") in specs and col in {c.name for c in specs[s["scorer"]].scores}]
    if declared:
        return declared[-1]
    best: tuple[int, int] | None = None
    for i, s in enumerate(steps):
        name = f"{SCORE_PREFIX}{s.get('scorer')}"
        if col == name or col.startswith(name + "_"):
            if best is None or len(name) > best[0]:
                best = (len(name), i)
    return None if best is None else best[1]


def _sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    if frame.height <= n:
        return frame
    return frame.sample(n=n, seed=seed).sort("uid")


def _rows(frame: pl.DataFrame) -> list[tuple[str, str | None, str | None]]:
    loc = frame["location"].to_list() if "location" in frame.columns else [None] * frame.height
    lab = frame["label"].to_list() if "label" in frame.columns else [None] * frame.height
    return list(zip(frame["uid"].to_list(), loc, lab))


def _caption(uid: str, label: str | None, reason: str | None = None) -> str:
    parts = [uid if len(uid) <= 28 else "…" + uid[-27:]]
    if label is not None:
        parts.append(f"[{label}]")
    if reason:
        parts.append(reason)
    return " ".join(parts)


def _figure(width: float, height: float, ncols: int = 1):
    # Figure without pyplot: no global state, safe to build from any thread, never opens a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _plot(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img class='plot' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    th = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{th}<tbody>{body}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id='{sid}'><h2>{_e(title)}</h2>{body}</section>"


def _absent(why: str) -> str:
    return f"<p class='absent'>Not available: {_e(why)}.</p>"


def _knobs(knobs: Any) -> str:
    if not knobs:
        return ""
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) if isinstance(knobs, dict) else str(knobs)


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;color:#212529;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #dee2e6;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1.05em;margin:.9em 0 .4em}
table{border-collapse:collapse;margin:.4em 0;font-size:.85em}td,th{border:1px solid #dee2e6;padding:.2em .6em;text-align:left}
th{background:#f1f3f5}pre{background:#f8f9fa;padding:.6em;font-size:.8em;overflow:auto}
img.plot{max-width:100%;height:auto;display:block;margin:.4em 0}
.grid{display:flex;flex-wrap:wrap;gap:6px}.pair-grid{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}
figure{margin:0;width:96px;font-size:.62em;text-align:center;overflow-wrap:anywhere}
img.thumb,.thumb.missing{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#f1f3f5;display:block}
.thumb.missing{display:flex;align-items:center;justify-content:center;color:#868e96}
.dup-pair{display:flex;gap:2px;padding:4px;border:1px solid #dee2e6;border-radius:4px}
.class-row{border-top:1px solid #e9ecef;padding:.3em 0}.class-row h4{margin:.2em 0}
.he{display:flex;gap:.6em;align-items:flex-start;margin:.2em 0}.he-title{width:5em;font-size:.8em;color:#495057}
.grid.kept img{outline:2px solid #2b8a3e}.grid.dropped img{outline:2px solid #c92a2a}
.absent{color:#868e96;font-style:italic}.note{font-size:.85em;color:#495057;margin:.2em 0}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
