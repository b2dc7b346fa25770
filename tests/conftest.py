"""Shared test setup: offline environment, paths to the shared real data, the tiny open_clip config."""
from __future__ import annotations

import json
import os
from pathlib import Path

# Nothing in the tests may wait on the internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run by default, so a landing gate cannot turn red by chance;
# HYPOTHESIS_PROFILE=explore draws fresh random examples (500 where a test sets no count) when hunting for bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

SHARED_DATA = Path(os.environ.get("WINNOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "winnow-tiny-test"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA} (set WINNOW_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar_subset(shared_data: Path) -> Path:
    path = shared_data / "images" / "cifar10_subset"
    if not path.is_dir():
        pytest.skip(f"{path} missing from the shared data")
    return path


@pytest.fixture(scope="session")
def tiny_clip_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registers the tiny open_clip config (random weights) and returns its model name."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("clip_cfg")
    cfg_path = cfg_dir / f"{TINY_CLIP_NAME}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    return TINY_CLIP_NAME


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect engine (its embedded local server on a temporary database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tiny_clip_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint file of the tiny model (seeded random weights), for the pretrained-path route."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_model, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path
