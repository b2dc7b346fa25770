"""Caption embeddings in the DataComp layout (per-shard .npz beside the .parquet, arrays b32_txt / l14_txt) and in a
table's Parquet column of float lists: real files, a real store, clip_score end to end; rows matched by uid."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import stages
from pipeline.config import CurateConfig
from pipeline.manifest import read_manifest, read_run_info
from pipeline.sources import SourceError
from pipeline.store import EmbeddingStore


def _run(cfg: dict) -> Path:
    c = CurateConfig.model_validate(cfg)
    stages.run_in_process(c)
    return c.run_dir


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _datacomp(root: Path, image: np.ndarray, text: np.ndarray, order: np.ndarray, *, b32_dim: int = 16) -> dict:
    """Our image embeddings (img/, metadata/ with uid u0000.. in row order) and DataComp's shard files for the same
    uids in another order (`order`: which of our rows each DataComp row is; rows not listed have no DataComp row):
    shards/00000000.parquet (uid) + shards/00000000.npz (l14_txt = `text` rows in that order, b32_txt of another dim,
    l14_img / b32_img)."""
    for sub in ("img", "metadata", "shards"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = len(image)
    uids = [f"u{i:04d}" for i in range(n)]
    np.save(root / "img" / "00000000.npy", image)
    pl.DataFrame({"uid": uids, "caption": [f"caption {u}" for u in uids]}).write_parquet(root / "metadata" / "00000000.parquet")
    rng = np.random.default_rng(0)
    theirs = [uids[i] if i < n else f"other{i}" for i in order]  # i >= n: a uid our shard lacks
    pl.DataFrame({"uid": theirs}).write_parquet(root / "shards" / "00000000.parquet")
    def pad(x: np.ndarray) -> np.ndarray:  # rows for the uids ours lacks: random
        return np.concatenate([x, rng.standard_normal((int(order.max()) + 1, x.shape[1])).astype(np.float32)])[order]

    np.savez(root / "shards" / "00000000.npz", l14_txt=pad(text).astype(np.float16), l14_img=pad(image).astype(np.float16),
             b32_txt=rng.standard_normal((len(order), b32_dim)).astype(np.float16),
             b32_img=rng.standard_normal((len(order), b32_dim)).astype(np.float16))
    return {"kind": "precomputed", "emb_paths": str(root / "img" / "*.npy"), "meta_paths": str(root / "metadata" / "*.parquet"),
            "uid_column": "uid", "caption_column": "caption", "text_emb_paths": str(root / "shards" / "*.npz")}


def test_clip_score_reads_datacomp_npz_text_matched_by_uid(tmp_path):
    rng = np.random.default_rng(7)
    n, d = 200, 24
    image = rng.standard_normal((n, d)).astype(np.float32)
    text = image + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    mismatched = rng.choice(n, 20, replace=False)
    text[mismatched] = rng.standard_normal((20, d))
    # DataComp's rows: ours shuffled, 6 of ours missing (no caption embedding), 5 uids ours lacks
    missing = np.setdiff1d(np.arange(n), mismatched)[:6]
    order = rng.permutation(np.r_[np.setdiff1d(np.arange(n), missing), np.arange(n, n + 5)])
    spec = _datacomp(tmp_path / "dc", image, text, order)
    base = {"embed": {"kind": "precomputed"}, "index": {"k": 4}, "output_root": str(tmp_path / "runs"), "report": False}
    run_dir = _run({**base, "name": "dc", "source": spec, "steps": [{"scorer": "clip_score", "keep_fraction": 0.9}]})
    m = read_manifest(run_dir).sort("uid")
    score = m["score_clip"].to_numpy()
    has = np.ones(n, bool)
    has[missing] = False
    expected = np.einsum("ij,ij->i", _unit(image), _unit(text))  # l14_txt (dim 24 = the image dim) chosen by dimension
    np.testing.assert_allclose(score[has], expected[has], atol=3e-3)  # float16 npz and store
    assert m.filter(pl.col("uid").is_in([f"u{i:04d}" for i in missing]))["score_clip"].is_null().all()
    dropped = {int(u[1:]) for u in m.filter(pl.col("reason") == "clip_score")["uid"].to_list()}
    assert dropped == set(mismatched.tolist())  # keep 90% of 200: exactly the 20 planted mismatches
    note = next(s for s in read_run_info(run_dir)["steps"] if s["scorer"] == "clip_score")
    assert note["text_embeddings"] == "source" and note["captions"] == n - len(missing)


def test_datacomp_text_key_is_chosen_or_refused_in_one_line(tmp_path):
    from pipeline import ingest

    rng = np.random.default_rng(8)
    image = rng.standard_normal((30, 16)).astype(np.float32)
    order = np.arange(30)

    def plan(spec: dict) -> None:
        ingest.plan_ingest(CurateConfig.model_validate({"source": spec, "embed": {"kind": "precomputed"}, "index": {"k": 2},
                                                        "output_root": str(tmp_path / "runs")}))

    # both b32_txt and l14_txt have the image dim 16: ambiguous until text_emb_key names one
    spec = _datacomp(tmp_path / "amb", image, image.copy(), order, b32_dim=16)
    with pytest.raises(SourceError, match=r"several text arrays have the image embeddings' dim 16 \(b32_txt, l14_txt\); choose one with text_emb_key"):
        plan(spec)
    plan({**spec, "text_emb_key": "b32_txt"})
    # no *_txt array of the image dim
    spec = _datacomp(tmp_path / "dim", rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal((30, 24)).astype(np.float32), order)
    with pytest.raises(SourceError, match="have b32_txt dim 16, l14_txt dim 24, the image embeddings dim 20") as err:
        plan(spec)
    assert "\n" not in str(err.value)
    with pytest.raises(SourceError, match=r"\[l14_txt\] have dim 24, the image embeddings 20"):
        plan({**spec, "text_emb_key": "l14_txt"})
    with pytest.raises(SourceError, match="no array 'l14_text'"):
        plan({**spec, "text_emb_key": "l14_text"})
    with pytest.raises(SourceError, match="text_emb_key names an array of DataComp .npz"):
        plan({**spec, "text_emb_paths": spec["emb_paths"], "text_emb_key": "l14_txt"})


def test_cli_refuses_a_datacomp_text_array_of_another_dimension_before_the_run(tmp_path, capsys):
    from flows.cli import main

    rng = np.random.default_rng(9)
    spec = _datacomp(tmp_path / "dc", rng.standard_normal((30, 20)).astype(np.float32),
                     rng.standard_normal((30, 24)).astype(np.float32), np.arange(30))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"name": "dim", "source": spec, "embed": {"kind": "precomputed"}, "index": {"k": 2},
                               "output_root": str(tmp_path / "runs"), "report": False,
                               "steps": [{"scorer": "clip_score", "keep_fraction": 0.5}]}))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "runs").exists()  # refused before the run started
    assert len(err) == 1 and err[0].startswith("winnow: error:") and "the image embeddings dim 20" in err[0]


def test_clip_score_reads_a_table_text_embedding_column_matched_by_uid(tiny_clip_model, cifar_subset, tmp_path):
    images = sorted((cifar_subset / "test").rglob("*.jpg"))[:80]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")  # an undecodable row early in the table: the store's ok rows are not the table's rows
    paths = [str(images[0]), str(broken), *map(str, images[1:])]
    uids = [f"id{i:03d}" for i in range(len(paths))]
    table = tmp_path / "t.parquet"
    pl.DataFrame({"path": paths, "uid": uids}).write_parquet(table)
    embed = {"kind": "clip", "model": tiny_clip_model, "pretrained": None, "num_workers": 0, "device": "cpu", "dtype": "float32"}
    base = {"embed": embed, "index": {"k": 3}, "output_root": str(tmp_path / "runs"), "store_dir": str(tmp_path / "store"), "report": False}
    source = {"kind": "table", "path": str(table), "uid_column": "uid"}
    _run({**base, "name": "first", "source": source})
    emb, meta = EmbeddingStore(tmp_path / "store").load()
    by_uid = dict(zip(meta.filter(pl.col("status") == "ok")["uid"].to_list(), np.asarray(emb, np.float32)))
    assert "id001" not in by_uid and len(by_uid) == len(images)
    # the caption embeddings DataComp-style, a list column in the table: image + noise, 10 planted random, 4 null
    rng = np.random.default_rng(10)
    ok_uids = sorted(by_uid)
    planted = set(rng.choice(ok_uids, 10, replace=False).tolist())
    no_text = set(rng.choice(sorted(set(ok_uids) - planted), 4, replace=False).tolist())
    d = len(next(iter(by_uid.values())))
    column = []
    for uid in uids:
        if uid not in by_uid or uid in no_text:
            column.append(None)
        elif uid in planted:
            column.append(rng.standard_normal(d).tolist())
        else:
            column.append((by_uid[uid] + 0.05 * rng.standard_normal(d)).tolist())
    pl.DataFrame({"path": paths, "uid": uids, "txt": column}, schema_overrides={"txt": pl.List(pl.Float32)}).write_parquet(table)
    run_dir = _run({**base, "name": "second", "source": {**source, "text_embedding_column": "txt"},
                    "steps": [{"scorer": "clip_score", "threshold": 0.5, "text_embeddings": "source"}]})
    m = read_manifest(run_dir).filter(pl.col("status") == "ok")
    assert m.filter(pl.col("uid").is_in(sorted(no_text)))["score_clip"].is_null().all()
    assert set(m.filter(pl.col("reason") == "clip_score")["uid"].to_list()) == planted
    kept = m.filter(pl.col("uid").is_in(sorted(set(ok_uids) - planted - no_text)))["score_clip"].to_numpy()
    assert kept.min() > 0.9  # image + small noise, matched to the right row
    # a column of another dimension than the model's: refused before any embedding
    pl.DataFrame({"path": paths, "uid": uids, "txt": [[0.5] * (d + 3)] * len(paths)}).write_parquet(table)
    with pytest.raises(SourceError, match=f"holds text embeddings of dim {d + 3}, the image embeddings .* dim {d}"):
        _run({**base, "name": "third", "store_dir": str(tmp_path / "store3"), "source": {**source, "text_embedding_column": "txt"},
              "steps": [{"scorer": "clip_score", "keep_fraction": 0.5}]})
    assert not (tmp_path / "store3").exists() or not EmbeddingStore(tmp_path / "store3").shards()
