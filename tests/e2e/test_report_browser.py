"""The run report rendered by a real browser: curate flow → manifest → report.html → headless Chromium.

Uses Debian's chromium (`apt-get install -y chromium`); skips with the reason when /usr/bin/chromium is absent.
Chromium reports from the rendered page which images actually decoded (naturalWidth > 0) and screenshots it.
"""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from flows.demo import digit_image

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 4000)
SECTIONS = ["summary", "counts", "kept-by-class", "kept-by-cluster", "histograms", "dbp", "semdedup", "evaluation", "grids",
            "duplicates", "hardest-easiest", "check-galleries"]

# Injected into a copy of the report only (the report itself has no script): after load, every <img> records
# what the browser made of it, so the dumped DOM says which data: URIs really decoded.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute('data-natural-width', String(imgs[i].naturalWidth));
    imgs[i].setAttribute('data-natural-height', String(imgs[i].naturalHeight));
  }
  document.body.setAttribute('data-probed', String(imgs.length));
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install -y chromium); the report browser test needs it")
    return CHROMIUM


def _chromium(binary: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _write_digits(folder: Path, n: int = 200, copies: int = 3) -> None:
    """Real 8×8 digit scans (scikit-learn's bundled set) as 32×32 PNGs in class folders, plus exact copies."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(n):
        path = folder / str(int(digits.target[i])) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[i]).save(path)
        paths.append(path)
    for j, src in enumerate(paths[:copies]):
        shutil.copyfile(src, src.with_name(f"zcopy{j}_{src.name}"))


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.current: str | None = None
        self.imgs: list[tuple[str | None, dict[str, str | None]]] = []  # (section, attributes)
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "section":
            self.current = a.get("id")
            self.sections.append(self.current or "")
        elif tag == "img":
            self.imgs.append((self.current, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None


def test_report_renders_in_chromium(chromium: Path, prefect_server, tmp_path: Path) -> None:
    from flows.curate import run_curate
    from pipeline.manifest import read_manifest
    from pipeline.report import write_report

    _write_digits(tmp_path / "digits")
    run_curate({
        "name": "browser",
        "source": {"kind": "image_folder", "root": str(tmp_path / "digits")},
        "embed": {"kind": "pixels", "shard_size": 100, "num_workers": 0, "pixels": {"size": 16, "grey": True, "dim": 24}},
        "index": {"k": 8},
        "steps": [
            {"scorer": "exact_dup"},
            {"scorer": "semdedup", "eps": 0.05, "eps_grid": [0.01, 0.02, 0.05, 0.1]},
            {"scorer": "dbp", "keep_fraction": 0.5},
            {"scorer": "prototype"},
        ],
        "output_root": str(tmp_path / "runs"),
    })
    report = write_report(tmp_path / "runs" / "browser", grid_size=12, pairs=4, per_class=3, max_classes=5)

    # 1. The DOM as Chromium built it, images decoded by the browser itself.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dumped = _chromium(chromium, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    dom = _Dom()
    dom.feed(dumped)
    assert dom.sections == SECTIONS
    assert int(dom.body.get("data-probed") or 0) == len(dom.imgs) > 0, "the probe did not run after load"
    plots = [a for _, a in dom.imgs if "plot" in (a.get("class") or "").split()]
    thumbs = [(s, a) for s, a in dom.imgs if "thumb" in (a.get("class") or "").split()]
    # one histogram per score column (3) + counts, class, cluster, DBP, SemDeDup
    assert len(plots) == 8
    assert all(int(a["data-natural-width"]) >= 300 and int(a["data-natural-height"]) >= 150 for a in plots)
    grid = [a for s, a in thumbs if s == "grids"]
    dups = [a for s, a in thumbs if s == "duplicates"]
    hard = [a for s, a in thumbs if s == "hardest-easiest"]
    frame = read_manifest(report.parent)
    n_pairs = sum(min(4, frame.filter(pl.col("reason") == r).height) for r in ("exact_dup", "semdedup"))
    assert frame.filter(pl.col("reason") == "exact_dup").height == 3 and n_pairs > 3
    assert len(grid) == 24 and len(dups) == 2 * n_pairs and len(hard) == 5 * 2 * 3
    undecoded = [a.get("title") for _, a in thumbs if int(a.get("data-natural-width") or 0) == 0]
    assert not undecoded, f"images the browser could not decode: {undecoded[:5]}"
    assert all((a.get("src") or "").startswith("data:image/") for _, a in dom.imgs)

    # 2. A screenshot of the report itself (no probe), kept under the test's tmp dir.
    shot = tmp_path / "report.png"
    _chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", report.as_uri())
    assert shot.stat().st_size > 50_000
    im = Image.open(shot).convert("RGB")
    assert im.size == WINDOW
    pixels = np.asarray(im)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and photos, not a blank page
    # every 500-px band of the first 3000 px has content (tables, plots, thumbnails), not just the top
    for top in range(0, 3000, 500):
        band = pixels[top:top + 500]
        assert (band < 200).any(axis=2).mean() > 0.005, f"band at y={top} is blank"
    print(f"report screenshot: {shot} ({shot.stat().st_size:,} bytes, {im.size[0]}x{im.size[1]})")
