import numpy as np
import pytest
from PIL import Image, ImageFilter

from scorers.quality import STAT_COLUMNS, image_stats, quality_issues


def _texture(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((size, size), Image.Resampling.NEAREST)


def test_stats_of_known_images():
    black = image_stats(np.zeros((50, 70, 3), np.uint8), n_bytes=350, width=70, height=50)
    assert set(black) == set(STAT_COLUMNS)
    assert black["q_blur"] == 0 and black["q_entropy"] == 0 and black["q_contrast"] == 0
    assert black["q_dark_fraction"] == 1 and black["q_bright_fraction"] == 0 and black["q_brightness"] == 0
    assert black["q_bytes_per_pixel"] == pytest.approx(0.1)
    grey = image_stats(np.full((20, 20, 3), 128, np.uint8))
    assert grey["q_colourfulness"] == 0 and np.isnan(grey["q_bytes_per_pixel"])
    red = image_stats(np.dstack([np.full((20, 20), 255, np.uint8), np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)]))
    assert red["q_colourfulness"] > 50
    sharp = image_stats(_texture(0))
    blurred = image_stats(_texture(0).filter(ImageFilter.GaussianBlur(4)))
    assert blurred["q_blur"] < sharp["q_blur"] / 10
    assert sharp["q_entropy"] > 6


def _planted() -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    images, sizes, truth = [], [], {}
    for i in range(40):
        images.append(_texture(i))
    def plant(name: str, im: Image.Image) -> None:
        truth.setdefault(name, []).append(len(images))
        images.append(im)
    for i in range(3):
        plant("blurry", _texture(100 + i).filter(ImageFilter.GaussianBlur(5)))
        plant("dark", Image.eval(_texture(200 + i), lambda v: v // 8))
        plant("overexposed", Image.eval(_texture(300 + i), lambda v: 230 + v // 12))
        plant("tiny", _texture(400 + i).resize((12, 12)))
        plant("odd_aspect", _texture(500 + i).resize((400, 60)))
    rows = [image_stats(im) for im in images]
    stats = {c: np.array([r[c] for r in rows]) for c in STAT_COLUMNS}
    stats["width"] = np.array([im.size[0] for im in images])
    stats["height"] = np.array([im.size[1] for im in images])
    return stats, truth


def test_default_thresholds_find_each_planted_problem_and_nothing_else():
    stats, truth = _planted()
    result = quality_issues(stats)
    for check, rows in truth.items():
        assert set(np.flatnonzero(result.failed[check])) == set(rows), check
    planted = {r for rows in truth.values() for r in rows}
    assert all(result.issue[i] is None for i in range(len(result.issue)) if i not in planted)
    assert "greyscale" not in result.failed  # off by default


def test_quantile_threshold_and_switching_checks_off():
    stats, truth = _planted()
    n = len(stats["width"])
    result = quality_issues(stats, min_blur={"quantile": 3 / n}, max_dark_fraction=None, min_side=None, min_entropy=None,
                            min_contrast=None)
    assert "dark" not in result.failed and "tiny" not in result.failed
    assert result.failed["blurry"].sum() <= 3
    assert result.thresholds["blurry"] == pytest.approx(np.quantile(stats["q_blur"], 3 / n))
    with pytest.raises(ValueError, match="quantile"):
        quality_issues(stats, min_blur={"quantile": 2})
    with pytest.raises(ValueError, match="number"):
        quality_issues(stats, min_blur="low")


def test_a_row_failing_two_checks_lists_both_and_nan_passes():
    stats = {c: np.array([np.nan, np.nan]) for c in STAT_COLUMNS}
    stats["q_dark_fraction"] = np.array([1.0, np.nan])
    stats["width"], stats["height"] = np.array([10, 100]), np.array([10, 100])
    result = quality_issues(stats)
    assert result.issue[0] == "tiny,dark" and result.issue[1] is None
