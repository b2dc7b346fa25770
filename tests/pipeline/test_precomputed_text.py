"""Caption embeddings shipped with precomputed image embeddings (LAION text_emb/*.npy): checked when listed, copied into
the store beside the image rows, and read by clip_score instead of the text tower."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import fill_store, ingest
from pipeline.config import CurateConfig
from pipeline.sources import SourceError
from pipeline.store import EmbeddingStore, StoreError


def _laion(folder: Path, images: list[np.ndarray], texts: list[np.ndarray]) -> dict:
    """The LAION layout: img_emb/, text_emb/, metadata/ (key, caption)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    start = 0
    for i, (x, t) in enumerate(zip(images, texts)):
        np.save(folder / "img_emb" / f"img_emb_{i:04d}.npy", x)
        np.save(folder / "text_emb" / f"text_emb_{i:04d}.npy", t)
        keys = [f"k{start + r:04d}" for r in range(len(x))]
        pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys]}), folder / "metadata" / f"metadata_{i:04d}.parquet")
        start += len(x)
    return {"kind": "precomputed", "emb_paths": str(folder / "img_emb" / "*.npy"), "meta_paths": str(folder / "metadata" / "*.parquet"),
            "text_emb_paths": str(folder / "text_emb" / "*.npy"), "caption_column": "caption"}


def _cfg(tmp_path: Path, source: dict) -> CurateConfig:
    return CurateConfig.model_validate({"source": source, "embed": {"kind": "precomputed"}, "index": {"k": 2},
                                        "store_dir": str(tmp_path / "store"), "output_root": str(tmp_path / "runs")})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_text_embeddings_are_copied_beside_the_ok_image_rows(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((5, 8)).astype(np.float16), rng.standard_normal((4, 8)).astype(np.float16)]
    texts = [rng.standard_normal((5, 8)).astype(np.float16) * 3, rng.standard_normal((4, 8)).astype(np.float16)]
    images[0][1] = 0.0  # a bad image row: dropped from both arrays
    texts[1][2] = 0.0  # no caption embedding: kept as a zero row
    texts[1][3, 0] = np.nan
    cfg = _cfg(tmp_path, _laion(tmp_path / "laion", images, texts))
    store = fill_store.ingest_precomputed(cfg, ingest.plan_ingest(cfg))
    emb, meta = store.load()
    text = store.load_text()
    ok = np.r_[0, 2, 3, 4, 5, 6, 7, 8]
    all_text = np.concatenate(texts).astype(np.float32)
    assert text.shape == emb.shape == (8, 8) and meta["uid"].to_list() == [f"k{i:04d}" for i in ok]
    good = np.isfinite(all_text).all(axis=1) & (np.abs(all_text).sum(axis=1) > 0)
    expected = np.where(good[:, None], _unit(np.where(good[:, None], all_text, 1.0)), 0.0)[ok]
    np.testing.assert_allclose(text, expected, atol=2e-3)  # float16 store
    assert (np.abs(text[-2:]).sum(axis=1) == 0).all()
    # a store without text embeddings says so; a store missing some shards' text files is refused
    assert EmbeddingStore(tmp_path / "none").load_text() is None
    store.text_path(1).unlink()
    with pytest.raises(StoreError, match="some shards only"):
        store.load_text()


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t[:, :6], "have dim 6, the image embeddings 8: clip_score needs both from one CLIP model"),
    (lambda t: t[:3], "row count mismatch"),
])
def test_text_embeddings_that_do_not_fit_are_refused_when_listed(tmp_path, break_it, message):
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((5, 8)).astype(np.float32)]
    spec = _laion(tmp_path / "laion", images, [break_it(rng.standard_normal((5, 8)).astype(np.float32))])
    with pytest.raises(SourceError, match=message) as err:
        ingest.plan_ingest(_cfg(tmp_path, spec))
    assert "\n" not in str(err.value)


def test_text_and_image_file_counts_must_pair(tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
    spec = _laion(tmp_path / "laion", images, [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)])
    (tmp_path / "laion" / "text_emb" / "text_emb_0001.npy").unlink()
    with pytest.raises(SourceError, match="2 embedding file.* but 1 text embedding file"):
        ingest.plan_ingest(_cfg(tmp_path, spec))
