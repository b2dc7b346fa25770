"""Image-quality statistics and threshold checks (the checks cleanvision and fastdup run: blurry, dark, overexposed,
low information, tiny, odd aspect ratio, greyscale).

Statistics (:func:`image_stats`, computed once per image while it is decoded for embedding, from the decoded RGB pixels):
- ``q_blur``: variance of the Laplacian (4-neighbour kernel) — Pech-Pacheco et al., ICPR 2000, "Diatom autofocusing
  in brightfield microscopy", the usual blur measure — of a fixed-size grey copy (each side shrunk to at most
  ``size`` px, never enlarged: enlarging a small image would itself blur it), divided by the copy's grey variance.
  Higher = sharper. The division makes it a ratio of high-frequency to total contrast, so a dark or washed-out but
  sharp image is not called blurry (the raw variance scales with contrast squared); 0 for a flat image.
- ``q_brightness``: mean luma in [0, 1] (ITU-R BT.601 weights, Pillow's "L").
- ``q_dark_fraction`` / ``q_bright_fraction``: fraction of pixels with luma < 40 / > 215 (of 255).
- ``q_contrast``: standard deviation of luma, in [0, 0.5].
- ``q_colourfulness``: Hasler & Süsstrunk, 2003, "Measuring colourfulness in natural images" (M3, 0..~200, 0 = grey).
- ``q_entropy``: Shannon entropy of the 256-bin luma histogram, bits (0..8); low = little information.
- ``q_bytes_per_pixel``: encoded file size / full-resolution pixels (very low: near-blank or heavily compressed).
Width and height are the store's (full-resolution) ones.

Checks (:func:`quality_issues`): each compares one statistic with a threshold — a number, or ``{"quantile": q}`` to take
the q-quantile of the dataset (for a ``min_*`` check the rows below the q-quantile fail, for ``max_*`` the rows above the
(1 − q)-quantile). None switches a check off. Defaults are documented per knob below and in the README.

Orientation: the statistics are measurements, not keep scores; for ``q_blur``, ``q_contrast``, ``q_entropy`` higher =
better; for the dark/bright fractions lower = better.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np

from scorers.step import Describe, Score, ScoringContext, StepOutput, step

__all__ = ["STAT_COLUMNS", "CHECKS", "image_stats", "QualityResult", "quality_issues"]

STAT_COLUMNS = ("q_blur", "q_brightness", "q_dark_fraction", "q_bright_fraction", "q_contrast", "q_colourfulness",
                "q_entropy", "q_bytes_per_pixel")
DARK_LUMA, BRIGHT_LUMA = 40, 215

# check name → (statistic, direction): "min" fails below the threshold, "max" above it.
CHECKS: dict[str, tuple[str, str]] = {
    "tiny": ("short_side", "min"),
    "odd_aspect": ("aspect", "max"),
    "blurry": ("q_blur", "min"),
    "dark": ("q_dark_fraction", "max"),
    "overexposed": ("q_bright_fraction", "max"),
    "low_contrast": ("q_contrast", "min"),
    "low_information": ("q_entropy", "min"),
    "greyscale": ("q_colourfulness", "min"),
    "low_bytes_per_pixel": ("q_bytes_per_pixel", "min"),
}


def image_stats(image: Any, *, n_bytes: int | None = None, width: int | None = None, height: int | None = None,
                size: int = 64) -> dict[str, float]:
    """The quality statistics of one decoded image (see the module docstring).

    ``image``: a Pillow image or an H × W × 3 uint8 array (RGB). ``n_bytes`` and the full-resolution ``width``/
    ``height`` give ``q_bytes_per_pixel`` (NaN without them). ``size``: side of the grey copy for blur (64 px).
    Costs one resize to ``size``² and a few passes over it: measured ~1 ms of CPU a 32-px image, ~3.7 ms a 640×480 one
    (mostly the resize) on this machine's cores.
    """
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    target = (min(im.size[0], size), min(im.size[1], size))
    small = im.convert("RGB")
    if target != small.size:
        small = small.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    rgb = np.asarray(small, dtype=np.float32)
    grey = np.asarray(small.convert("L"), dtype=np.float32)
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
    grey_var = float(grey.var())
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    w, h = width or im.size[0], height or im.size[1]
    return {
        "q_blur": float(lap.var()) / grey_var if grey_var > 1e-6 and lap.size else 0.0,
        "q_brightness": float(grey.mean() / 255.0),
        "q_dark_fraction": float((grey < DARK_LUMA).mean()),
        "q_bright_fraction": float((grey > BRIGHT_LUMA).mean()),
        "q_contrast": float(grey.std() / 255.0),
        "q_colourfulness": colourfulness,
        "q_entropy": float(-(p * np.log2(p)).sum()),
        "q_bytes_per_pixel": float(n_bytes) / (w * h) if n_bytes is not None and w and h else float("nan"),
    }


@dataclass(frozen=True)
class QualityResult:
    issue: np.ndarray  # object [n]: failed checks joined by "," (in CHECKS order), None where every check passed
    failed: dict[str, np.ndarray]  # check → bool [n]
    thresholds: dict[str, float] = field(default_factory=dict)  # resolved thresholds (quantiles turned into numbers)


def _resolve(values: np.ndarray, spec: Any, direction: str, check: str) -> float | None:
    if spec is None:
        return None
    if isinstance(spec, dict):
        if set(spec) != {"quantile"}:
            raise ValueError(f"quality {check}: a threshold is a number or {{quantile: q}}, got {spec!r}")
        q = spec["quantile"]
        if not (isinstance(q, (int, float)) and 0 <= q <= 1):
            raise ValueError(f"quality {check}: quantile must be in [0, 1], got {q!r}")
        finite = values[np.isfinite(values)]
        if not len(finite):
            return None
        return float(np.quantile(finite, q if direction == "min" else 1 - q))
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(f"quality {check}: a threshold is a number or {{quantile: q}}, got {spec!r}")
    return float(spec)


def quality_issues(
    stats: dict[str, np.ndarray],
    *,
    min_side: Any = 32,
    max_aspect: Any = 4.0,
    min_blur: Any = 0.15,
    max_dark_fraction: Any = 0.9,
    max_bright_fraction: Any = 0.9,
    min_contrast: Any = 0.03,
    min_entropy: Any = 3.0,
    min_colourfulness: Any = None,
    min_bytes_per_pixel: Any = None,
) -> QualityResult:
    """Which rows fail which check, from per-row statistics (arrays keyed by STAT_COLUMNS plus ``width``, ``height``).

    Defaults: tiny below 32 px on the short side; odd aspect beyond 4:1; blurry below a contrast-normalised Laplacian
    variance of 0.15 on the ≤ 64-px grey copy (0 of 700 clean CIFAR-10 images, 93% of them blurred
    with radius 1.2, and the one motion-blurred photo of the 22 shared photos fall below it); dark / overexposed when ≥ 90% of pixels are below luma 40 / above 215; low contrast below
    a luma std of 0.03; low information below 3 bits of luma entropy; greyscale and bytes-per-pixel off. A row with a
    NaN statistic passes that check (the statistic was not measured, e.g. a precomputed store).
    Returns :class:`QualityResult`; a failing row's ``issue`` lists every check it fails.
    """
    width = np.asarray(stats["width"], dtype=np.float64)
    height = np.asarray(stats["height"], dtype=np.float64)
    n = len(width)
    derived = {"short_side": np.minimum(width, height),
               "aspect": np.maximum(width, height) / np.maximum(np.minimum(width, height), 1.0)}
    knobs = {"tiny": min_side, "odd_aspect": max_aspect, "blurry": min_blur, "dark": max_dark_fraction,
             "overexposed": max_bright_fraction, "low_contrast": min_contrast, "low_information": min_entropy,
             "greyscale": min_colourfulness, "low_bytes_per_pixel": min_bytes_per_pixel}
    failed: dict[str, np.ndarray] = {}
    thresholds: dict[str, float] = {}
    for check, (stat, direction) in CHECKS.items():
        values = derived[stat] if stat in derived else np.asarray(stats.get(stat, np.full(n, np.nan)), dtype=np.float64)
        threshold = _resolve(values, knobs[check], direction, check)
        if threshold is None:
            continue
        thresholds[check] = threshold
        with np.errstate(invalid="ignore"):
            failed[check] = (values < threshold) if direction == "min" else (values > threshold)
    issue = np.full(n, None, dtype=object)
    for check, mask in failed.items():
        for i in np.flatnonzero(mask):
            issue[i] = check if issue[i] is None else f"{issue[i]},{check}"
    return QualityResult(issue=issue, failed=failed, thresholds=thresholds)

# ---- the curate step --------------------------------------------------------------------------------------------------

# A check's threshold: a number, {quantile: q} of the rows still alive, or null (check off).
Threshold = Annotated[float | dict[str, float] | None, Describe("a number, {quantile: q} or null (check off)")]


@step("quality", reason="low_quality",
      scores=tuple(Score(f"score_quality_{name}", higher=f"more {name}") for name in ("blur", "brightness", "contrast", "entropy")),
      orientation="score_quality_*: statistics measured while decoding (blur: contrast-normalised Laplacian variance, higher = "
                  "sharper); rows failing a check are dropped, quality_issue names the checks")
def step_quality(
    ctx: ScoringContext,
    *,
    min_side: Threshold = 32,
    max_aspect: Threshold = 4.0,
    min_blur: Threshold = 0.15,
    max_dark_fraction: Threshold = 0.9,
    max_bright_fraction: Threshold = 0.9,
    min_contrast: Threshold = 0.03,
    min_entropy: Threshold = 3.0,
    min_colourfulness: Threshold = None,
    min_bytes_per_pixel: Threshold = None,
) -> StepOutput:
    """Image-quality checks on the statistics measured while decoding for embedding (quality_issues above).

    Drops rows failing any check (reason low_quality) and names the failed checks in `quality_issue`. Each threshold is
    a number, {quantile: q} of the rows still alive, or null (check off). Scores: score_quality_blur, _brightness,
    _contrast, _entropy (measurements; higher blur/contrast/entropy = better).
    """
    meta = ctx.meta_columns(["width", "height", *STAT_COLUMNS])
    if all(np.isnan(np.asarray(meta[c], dtype=np.float64)).all() for c in STAT_COLUMNS):
        raise ValueError("quality needs the statistics measured while decoding; this store has none (precomputed "
                         "embeddings, or a store embedded before quality statistics existed: re-embed it)")
    rows = np.flatnonzero(ctx.alive)
    stats = {c: np.asarray(meta[c], dtype=np.float64)[rows] for c in ("width", "height", *STAT_COLUMNS)}
    result = quality_issues(stats, min_side=min_side, max_aspect=max_aspect, min_blur=min_blur,
                            max_dark_fraction=max_dark_fraction, max_bright_fraction=max_bright_fraction,
                            min_contrast=min_contrast, min_entropy=min_entropy, min_colourfulness=min_colourfulness,
                            min_bytes_per_pixel=min_bytes_per_pixel)
    n = len(ctx.alive)
    issue = np.full(n, None, dtype=object)
    issue[rows] = result.issue
    drop = np.zeros(n, dtype=bool)
    drop[rows] = np.array([i is not None for i in result.issue], dtype=bool)
    scores = {f"score_quality_{name}": np.asarray(meta[f"q_{name}"], dtype=np.float32)
              for name in ("blur", "brightness", "contrast", "entropy")}
    return StepOutput(scores=scores, drop=drop, text={"quality_issue": issue},
                      info={"thresholds": result.thresholds, "failed_by_check": {c: int(m.sum()) for c, m in result.failed.items()}})
