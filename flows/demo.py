"""`winnow demo`: curate scikit-learn's bundled digits (1,797 real 8×8 scans) with the pixels embedder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

# The paper's order: exact dedup, then SemDeDup, then DBP to the final budget (half the dataset).
DEMO_STEPS = [
    {"scorer": "exact_dup"},
    {"scorer": "semdedup", "eps": 0.02, "eps_grid": [0.005, 0.01, 0.02, 0.05, 0.1]},
    {"scorer": "dbp", "keep_fraction": 0.5},
    {"scorer": "prototype"},
]


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One 8×8 digit scan (values 0–16) as a 32×32 greyscale image."""
    return Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").resize((32, 32), Image.NEAREST)


def write_digits(folder: Path) -> int:
    """Writes the digits as 32×32 greyscale PNGs in class subfolders (labels from folder names)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = folder / str(label) / f"{i:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(pixels).save(path)
    return len(digits.images)


def demo_config(out: Path) -> dict:
    return {
        "name": "digits-demo",
        "source": {"kind": "image_folder", "root": str(out / "digits")},
        # Tiny PNGs decode faster in-process than worker processes start: no DataLoader workers here.
        "embed": {"kind": "pixels", "shard_size": 500, "num_workers": 0, "pixels": {"size": 16, "grey": True, "dim": 32}},
        "index": {"k": 20},
        "steps": DEMO_STEPS,
        "output_root": str(out / "runs"),
    }


def run_demo(out: Path) -> tuple[dict, Path]:
    """Writes the digits and the demo config under `out` and runs it; returns run.json's content and the manifest path
    (the CLI prints the summary)."""
    from flows.curate import run_curate

    n = write_digits(out / "digits")
    config = demo_config(out)
    config_path = out / "digits-demo.yaml"
    # the file's paths are relative to its own folder (how `winnow run` reads them), so it runs from any directory
    config_path.write_text(yaml.safe_dump(demo_config(Path(".")), sort_keys=False))
    print(f"demo: {n} digit images in {out / 'digits'}; embedder: pixels (model-free, no weights needed)")
    print(f"demo: config written to {config_path}; the same run is `winnow run {config_path}`")
    info = run_curate(config)
    return info, Path(config["output_root"]) / config["name"] / "manifest.parquet"
