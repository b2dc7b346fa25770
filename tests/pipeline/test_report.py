"""The HTML run report, built from real small runs: real digit scans, the real stages, the pixels embedder."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from flows.demo import digit_image
from pipeline import stages
from pipeline.config import CurateConfig
from pipeline.manifest import ManifestError, read_manifest, read_run_info, write_manifest
from pipeline.report import _cut, write_report

SECTIONS = ["summary", "counts", "kept-by-class", "kept-by-cluster", "histograms", "dbp", "semdedup", "evaluation", "grids", "duplicates",
            "hardest-easiest", "check-galleries"]
N_DIGITS = 240
EXACT_COPIES = 4


def _run(cfg_dict: dict) -> Path:
    """The curate stages in the flow's order without the Prefect engine (seconds, not a server start)."""
    cfg = CurateConfig.model_validate(cfg_dict)
    stages.run_in_process(cfg)
    return cfg.run_dir


def _write_digits(folder: Path, *, with_classes: bool) -> None:
    """Real 8×8 digit scans (scikit-learn's bundled set) as 32×32 PNGs, plus exact copies and one truncated file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(N_DIGITS):
        label = int(digits.target[i])
        path = folder / str(label) / f"{i:04d}.png" if with_classes else folder / f"{label}_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[i]).save(path)
        paths.append(path)
    for j, src in enumerate(paths[:EXACT_COPIES]):
        shutil.copyfile(src, src.with_name(f"zcopy{j}_{src.name}"))
    data = paths[-1].read_bytes()
    paths[-1].with_name(f"ztruncated_{paths[-1].name}").write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report_labelled")
    _write_digits(root / "digits", with_classes=True)
    return _run({
        "name": "labelled",
        "source": {"kind": "image_folder", "root": str(root / "digits")},
        "embed": {"kind": "pixels", "shard_size": 100, "num_workers": 0, "pixels": {"size": 16, "grey": True, "dim": 24}},
        "index": {"k": 8},
        "steps": [
            {"scorer": "exact_dup"},
            {"scorer": "semdedup", "eps": 0.05, "eps_grid": [0.01, 0.02, 0.05, 0.1]},
            {"scorer": "dbp", "keep_fraction": 0.5},
            {"scorer": "prototype"},
        ],
        "evaluate": {"seeds": 2, "sweep": True, "fractions": [0.3, 0.6]},
        "output_root": str(root / "runs"),
    })


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report_unlabelled")
    _write_digits(root / "flat", with_classes=False)
    return _run({
        "name": "unlabelled",
        "source": {"kind": "image_folder", "root": str(root / "flat")},
        "embed": {"kind": "pixels", "shard_size": 200, "num_workers": 0, "pixels": {"size": 16, "grey": True, "dim": 24}},
        "index": {"k": 6},
        "steps": [{"scorer": "exact_dup"}, {"scorer": "random", "keep_fraction": 0.6}],
        "output_root": str(root / "runs"),
    })


class _Page(HTMLParser):
    """Collects sections, images (with the section they sit in), attributes that reference anything, and text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.tags: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if a.get(name):
                self.references.append(a[name])
        if tag == "section":
            self.current = a["id"]
            self.sections[self.current] = {"plots": [], "thumbs": [], "missing": 0, "absent": [], "text": [], "classes": []}
        elif self.current is not None:
            sec = self.sections[self.current]
            cls = (a.get("class") or "").split()
            sec["classes"] += cls
            if tag == "img" and "plot" in cls:
                sec["plots"].append(a)
            elif tag == "img" and "thumb" in cls:
                sec["thumbs"].append(a)
            elif "missing" in cls:
                sec["missing"] += 1
            if "absent" in cls:
                sec["absent"].append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.sections[self.current]["text"].append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _decode_data_uri(uri: str) -> Image.Image:
    m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:60]
    im = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
    im.load()
    return im


def _text(page: _Page, section: str) -> str:
    return " ".join(page.sections[section]["text"])


def test_full_report_has_every_section_with_plots_and_thumbnails(labelled_run: Path) -> None:
    out = write_report(labelled_run, grid_size=10, pairs=3, per_class=2, max_classes=4, thumb_px=48)
    assert out == labelled_run / "report.html"
    page = _parse(out)
    assert list(page.sections) == SECTIONS
    for sid in SECTIONS:
        if sid == "check-galleries":  # this run has no basic-check step (tests/e2e/test_basic_checks.py covers it)
            assert page.sections[sid]["absent"]
            continue
        assert not page.sections[sid]["absent"], f"section {sid} says its data is absent"

    frame = read_manifest(labelled_run)
    info = read_run_info(labelled_run)
    scores = [c for c in frame.columns if c.startswith("score_")]
    assert sorted(scores) == ["score_dbp_cluster_complexity", "score_prototype", "score_semdedup"]
    sec = page.sections
    assert len(sec["histograms"]["plots"]) == len(scores)
    assert "selection − random" in _text(page, "evaluation").lower() and "suggested budget" in _text(page, "evaluation")
    assert info["evaluation"]["sweep"]["fractions"] == [0.3, 0.6]
    for sid in ("counts", "kept-by-class", "kept-by-cluster", "dbp", "semdedup", "evaluation"):
        assert len(sec[sid]["plots"]) == 1, sid
    # every plot is a real PNG of a reasonable size
    for s in sec.values():
        for img in s["plots"]:
            im = _decode_data_uri(img["src"])
            assert im.format == "PNG" and im.width >= 300 and im.height >= 150

    # grids: 10 kept + 10 dropped, every thumbnail a decodable small image
    assert len(sec["grids"]["thumbs"]) == 20 and sec["grids"]["missing"] == 0
    # duplicates: exact_dup gave EXACT_COPIES pairs (3 shown); semdedup's pairs (up to 3) — 2 thumbs per pair
    exact = frame.filter(pl.col("reason") == "exact_dup")
    semdup = frame.filter(pl.col("reason") == "semdedup")
    assert exact.height == EXACT_COPIES and semdup.height > 0
    assert len(sec["duplicates"]["thumbs"]) == 2 * (min(3, exact.height) + min(3, semdup.height))
    # hardest/easiest: 4 classes × (2 hardest + 2 easiest)
    assert len(sec["hardest-easiest"]["thumbs"]) == 4 * 4
    for s in sec.values():
        for img in s["thumbs"]:
            im = _decode_data_uri(img["src"])
            assert max(im.size) <= 48 and im.width > 0

    # self-contained: no script, no stylesheet link, every reference is an inline data URI
    assert "script" not in page.tags and "link" not in page.tags
    assert page.references and all(r.startswith("data:image/") for r in page.references)
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:|//)", out.read_text())

    # numbers in the page agree with the manifest
    assert f"{frame.height:,}" in _text(page, "summary")
    for reason, count in frame.group_by("reason").len().iter_rows():
        assert re.search(rf"{reason or 'kept'}\s+{count:,}\b", _text(page, "counts")), (reason, count)
    per_class = frame.filter(pl.col("label").is_not_null()).group_by("label").agg(pl.len(), pl.col("keep").sum())
    for label, n, kept in per_class.iter_rows():
        assert re.search(rf"\b{label}\s+{n}\s+{kept}\s+{kept / n:.1%}", _text(page, "kept-by-class")), (label, n, kept)
    # the SemDeDup cut is marked at 1 - eps
    eps = next(s for s in info["steps"] if s["scorer"] == "semdedup")["eps"]
    assert f"1 − ε = {1 - eps:.4g}" in _text(page, "histograms")


def test_duplicate_pairs_are_the_most_similar_first(labelled_run: Path, tmp_path: Path) -> None:
    out = write_report(labelled_run, tmp_path / "r2.html", pairs=2, grid_size=0, per_class=0)
    page = _parse(out)
    frame = read_manifest(labelled_run)
    top = frame.filter(pl.col("reason") == "semdedup").sort("score_semdedup", descending=True).head(2)
    shown = [img["title"] for img in page.sections["duplicates"]["thumbs"]]
    # exact pairs first (sorted by uid), then semantic pairs as (original, duplicate), most similar first
    exact = frame.filter(pl.col("reason") == "exact_dup").sort("uid").head(2)
    expected = [u for d, o in zip(exact["uid"], exact["dup_of"]) for u in (o, d)]
    expected += [u for d, o in zip(top["uid"], top["dup_of"]) for u in (o, d)]
    assert shown == expected
    # bad_input row (the truncated file) is in the manifest and counted
    assert frame.filter(pl.col("reason") == "bad_input").height == 1
    assert "bad_input" in _text(page, "counts")


def test_unlabelled_run_degrades_and_marks_a_hard_cut(unlabelled_run: Path) -> None:
    page = _parse(write_report(unlabelled_run, grid_size=6))
    sec = page.sections
    assert list(sec) == SECTIONS
    for sid in ("kept-by-class", "dbp", "semdedup", "hardest-easiest"):
        assert sec[sid]["absent"] and not sec[sid]["plots"] and not sec[sid]["thumbs"], sid
    assert "no labels" in _text(page, "kept-by-class")
    assert len(sec["grids"]["thumbs"]) == 12
    assert len(sec["duplicates"]["thumbs"]) == 2 * EXACT_COPIES
    # random keep_fraction without labels is one global threshold: the histogram marks it, between the groups
    frame = read_manifest(unlabelled_run)
    m = re.search(r"drops scores below ([0-9.]+)", _text(page, "histograms"))
    assert m, _text(page, "histograms")
    cut = float(m.group(1))
    dropped = frame.filter(pl.col("reason") == "random")["score_random"]
    kept = frame.filter(pl.col("keep"))["score_random"]
    assert dropped.max() < cut < kept.min()


def test_source_gone_or_precomputed_leaves_the_statistics(labelled_run: Path, tmp_path: Path) -> None:
    frame = read_manifest(labelled_run)
    info = read_run_info(labelled_run)
    for source, why in (({"kind": "image_folder", "root": str(tmp_path / "moved")}, "cannot be opened"),
                        ({"kind": "precomputed", "emb_paths": "x", "meta_paths": "y"}, "precomputed")):
        run = tmp_path / source["kind"]
        write_manifest(frame, run, {**info, "config": {**info["config"], "source": source}})
        page = _parse(write_report(run))
        for sid in ("grids", "duplicates", "hardest-easiest"):
            assert page.sections[sid]["absent"] and why in _text(page, sid), sid
        assert len(page.sections["histograms"]["plots"]) == 3
        assert sum(len(s["thumbs"]) for s in page.sections.values()) == 0


def test_unreadable_image_becomes_a_placeholder(labelled_run: Path, tmp_path: Path) -> None:
    info = read_run_info(labelled_run)
    src_root = Path(info["config"]["source"]["root"])
    copy = tmp_path / "digits"
    shutil.copytree(src_root, copy)
    # the dataset moved: its rows' locations point into the copy (a source refuses reads outside its root)
    frame = read_manifest(labelled_run).with_columns(pl.col("location").str.replace(str(src_root), str(copy), literal=True))
    kept = frame.filter(pl.col("keep")).sort("uid")
    (copy / kept["uid"][0]).unlink()
    run = tmp_path / "run"
    write_manifest(frame, run, {**info, "config": {**info["config"], "source": {"kind": "image_folder", "root": str(copy)}}})
    page = _parse(write_report(run, grid_size=frame.height, per_class=0, pairs=0))
    # every row is shown: placeholders for the deleted file and for the bad input (the truncated file)
    n_bad = frame.filter(pl.col("reason") == "bad_input").height
    assert n_bad == 1 and page.sections["grids"]["missing"] == 1 + n_bad
    assert len(page.sections["grids"]["thumbs"]) == frame.height - 1 - n_bad


def test_large_manifest_reads_only_the_shown_images(labelled_run: Path, tmp_path: Path) -> None:
    """50× the rows (same images under new uids): page size and thumbnail count stay bounded by the knobs."""
    frame = read_manifest(labelled_run)
    info = read_run_info(labelled_run)
    big = pl.concat([
        frame.with_columns((pl.col("uid") + f"#{i}").alias("uid"), (pl.col("dup_of") + f"#{i}").alias("dup_of"))
        for i in range(50)
    ])
    run = tmp_path / "big"
    write_manifest(big, run, info)
    small_page = write_report(labelled_run, tmp_path / "small.html")
    out = write_report(run)
    page = _parse(out)
    n_thumbs = sum(len(s["thumbs"]) + s["missing"] for s in page.sections.values())
    n_classes = frame["label"].drop_nulls().n_unique()
    # defaults: 24 kept + 24 dropped, 8 exact + 8 semantic pairs, 6 hardest + 6 easiest for each of the 10 classes
    assert n_thumbs == 2 * 24 + 2 * (8 + 8) + 2 * 6 * n_classes
    assert out.stat().st_size < 3 * small_page.stat().st_size
    assert f"{big.height:,}" in _text(page, "summary")


def test_cut_rules() -> None:
    steps = [{"scorer": "random"}, {"scorer": "prototype"}]
    reasons = ["random", "prototype"]
    values = np.array([0.1, 0.2, 0.8, 0.9, np.nan, 0.5], dtype=np.float32)
    reason = np.array(["random", "random", None, "prototype", "bad_input", None], dtype=object)
    cut, how = _cut("score_random", 0, steps, reasons, values, reason)
    assert cut == pytest.approx((0.2 + 0.5) / 2) and "below" in how
    reason_above = np.array([None, None, "random", "random", "bad_input", None], dtype=object)
    cut, how = _cut("score_random", 0, steps, reasons, values, reason_above)
    assert cut == pytest.approx((0.8 + 0.5) / 2) and "above" in how
    overlapping = np.array(["random", None, "random", None, None, None], dtype=object)
    assert _cut("score_random", 0, steps, reasons, values, overlapping)[0] is None
    assert _cut("score_x", None, steps, reasons, values, reason)[0] is None


def test_bad_input_is_a_clear_error(labelled_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="run.json"):
        write_report(tmp_path / "empty")
    with pytest.raises(ValueError, match="grid_size"):
        write_report(labelled_run, grid_size=-1)
    with pytest.raises(ValueError, match="hardness_column 'score_nope'"):
        write_report(labelled_run, hardness_column="score_nope")
    # a damaged manifest is not silently reported on
    bad = tmp_path / "bad"
    shutil.copytree(labelled_run, bad, ignore=shutil.ignore_patterns("store", "*.html"))
    (bad / "manifest.parquet" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError):
        write_report(bad)
    assert not (bad / "report.html").exists()
    json.loads((labelled_run / "run.json").read_text())  # the source run is untouched


def test_leak_pairs_show_the_eval_image_read_through_the_eval_source(tmp_path: Path) -> None:
    # Eval images named like training images (same class folder and file name, so the same uid) but other digits; three
    # byte copies of eval images planted in the training folder. A leak pair must show the eval image itself, read
    # through the leak step's eval source, not the training row that happens to share its uid.
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(60):
        path = tmp_path / "train" / str(digits.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[i]).save(path)
    evals = []
    for j in range(12):
        i = j  # same uid as training row j, pixels of digit 300 + j
        path = tmp_path / "eval" / str(digits.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[300 + 7 * j]).save(path)
        evals.append(path)
    for j in (2, 5, 9):
        shutil.copyfile(evals[j], tmp_path / "train" / str(digits.target[j]) / f"zleak{j}.png")
    run_dir = _run({
        "name": "leak",
        "source": {"kind": "image_folder", "root": str(tmp_path / "train")},
        "embed": {"kind": "pixels", "num_workers": 0, "pixels": {"size": 16, "grey": True, "dim": 16}},
        "index": {"k": 4},
        "steps": [{"scorer": "leak", "eval_sources": [{"kind": "image_folder", "root": str(tmp_path / "eval")}], "eps": 0.0001}],
        "output_root": str(tmp_path / "runs"),
    })
    m = read_manifest(run_dir).filter(pl.col("reason") == "leak")
    assert sorted(m["uid"].to_list()) == sorted(f"{digits.target[j]}/zleak{j}.png" for j in (2, 5, 9))
    page_html = (run_dir / "report.html").read_text(encoding="utf-8")
    duplicates = page_html[page_html.index("<section id='duplicates'"):]
    duplicates = duplicates[:duplicates.index("</section>")]
    grid = duplicates[duplicates.index("data-reason='leak'"):]
    figures = re.findall(r"<figure>(.*?)</figure>", grid)  # pairs: eval image, then the dropped training row
    assert len(figures) == 6 and grid.count("class='dup-pair'") == 3 and "thumb missing" not in grid
    sources = [re.search(r"src='([^']+)'", f).group(1) for f in figures]  # every figure has an image
    for eval_uri, train_uri, eval_fig in zip(sources[::2], sources[1::2], figures[::2]):
        assert "eval" in eval_fig and eval_uri.startswith("data:image/")
        eval_px = np.asarray(_decode_data_uri(eval_uri).convert("L"), dtype=np.int16)
        train_px = np.asarray(_decode_data_uri(train_uri).convert("L"), dtype=np.int16)
        assert np.array_equal(eval_px, train_px)  # a byte copy: the same thumbnail on both sides
        uid = re.search(r"title='([^']+)'", eval_fig).group(1)
        same_uid_train = tmp_path / "train" / uid  # the training image sharing the eval row's uid: another digit
        own = np.asarray(_decode_data_uri(_thumb_of(same_uid_train)).convert("L"), dtype=np.int16)
        assert not np.array_equal(own, eval_px)


def _thumb_of(path: Path) -> str:
    from pipeline.report import _thumb_uri

    return _thumb_uri(Image.open(path).convert("RGB"), 64)
