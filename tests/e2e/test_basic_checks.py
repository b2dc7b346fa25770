"""The #17 checks as steps of a real run (the stages in process, real JPEG files, real FAISS, real cleanlab):
planted blurred / darkened / tiny images, copies of test images in the training folder, a few off-domain photos,
and a safetensors head; then clip_score and label agreement with the tiny open_clip model's text tower."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageFilter

from pipeline import stages
from pipeline.config import CurateConfig
from pipeline.manifest import read_manifest, read_run_info


def _run(cfg: dict) -> Path:
    c = CurateConfig.model_validate(cfg)
    stages.run_in_process(c)
    return c.run_dir


def _jpeg(im: Image.Image, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=quality)


@pytest.fixture(scope="module")
def planted(cifar_subset: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(cifar_subset / "train", root / "train")
    shutil.copytree(cifar_subset / "test", root / "test")
    train = sorted((root / "train").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train), 30, replace=False)
    truth: dict[str, set[str]] = {"blurred": set(), "darkened": set(), "tiny": set(), "leak": set(), "off_domain": set()}
    for n, i in enumerate(picks):
        src = train[i]
        im = Image.open(src).convert("RGB")
        kind = ("blurred", "darkened", "tiny")[n % 3]
        if kind == "blurred":
            im = im.filter(ImageFilter.GaussianBlur(1.2))
        elif kind == "darkened":
            im = Image.eval(im, lambda v: int(v * 0.12))
        else:
            im = im.resize((12, 12), Image.Resampling.BILINEAR)
        _jpeg(im, src)
        truth[kind].add(str(src.relative_to(root / "train")))
    tests = sorted((root / "test").rglob("*.jpg"))
    for j, i in enumerate(rng.choice(len(tests), 8, replace=False)):
        dst = root / "train" / tests[i].parent.name / f"leak{j}.jpg"
        if j < 3:
            shutil.copyfile(tests[i], dst)  # byte-identical copy
        else:
            _jpeg(Image.open(tests[i]).convert("RGB"), dst, quality=95)  # re-encoded copy
        truth["leak"].add(str(dst.relative_to(root / "train")))
    # Off-domain junk the pixels embedder can see (it knows pixel statistics, not content; the benchmark measures
    # Fashion-MNIST images among CIFAR-10 with CNN features): coarse colour noise.
    for j in range(6):
        noise = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        dst = root / "train" / "cat" / f"noise{j}.jpg"
        _jpeg(Image.fromarray(noise).resize((32, 32), Image.Resampling.NEAREST), dst)
        truth["off_domain"].add(str(dst.relative_to(root / "train")))
    return root, truth


def test_quality_leak_outlier_label_issues_and_head_in_one_run(planted, tmp_path):
    from safetensors.numpy import save_file

    root, truth = planted
    rng = np.random.default_rng(1)
    head = tmp_path / "aesthetic.safetensors"
    dims = [64, 32, 16, 1]  # the LAION aesthetic MLP's shape, shrunk to the pixels embedder's 64 dims; random weights
    tensors = {}
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        tensors[f"layers.{2 * i}.weight"] = rng.standard_normal((b, a)).astype(np.float32)
        tensors[f"layers.{2 * i}.bias"] = np.zeros(b, np.float32)
    save_file(tensors, str(head), metadata={"embedder": "pixels"})
    run_dir = _run({
        "name": "basics",
        "source": {"kind": "image_folder", "root": str(root / "train")},
        "embed": {"kind": "pixels", "num_workers": 0, "dtype": "float32"},
        "index": {"k": 5},
        "steps": [
            {"scorer": "quality"},
            {"scorer": "leak", "eval_sources": [{"kind": "image_folder", "root": str(root / "test")}], "eps": 0.02},
            {"scorer": "outlier", "k": 10, "quantile": 0.04},  # k above the 6 planted: a group of ≤ k hides nothing
            {"scorer": "label_issues", "n_seeds": 2, "epochs": 5},
            {"scorer": "head", "path": str(head), "name": "aesthetic", "quantile": 0.1},
        ],
        "output_root": str(tmp_path / "runs"),
        "report": False,
    })
    m = read_manifest(run_dir)
    by = {r: set(m.filter(pl.col("reason") == r)["uid"].to_list()) for r in ("low_quality", "leak", "outlier", "label_issue", "head")}
    planted_quality = truth["blurred"] | truth["darkened"] | truth["tiny"]
    assert truth["darkened"] | truth["tiny"] <= by["low_quality"]
    assert len(truth["blurred"] & by["low_quality"]) >= 8  # of 10
    assert len(by["low_quality"] - planted_quality) <= 0.05 * m.height
    issues = dict(zip(m["uid"].to_list(), m["quality_issue"].to_list()))
    assert all("dark" in issues[u] for u in truth["darkened"]) and all("tiny" in issues[u] for u in truth["tiny"])
    assert by["leak"] == truth["leak"]
    leak_rows = m.filter(pl.col("reason") == "leak")
    assert leak_rows["dup_of"].null_count() == 0
    test_uids = {str(p.relative_to(root / "test")) for p in (root / "test").rglob("*.jpg")}
    assert set(leak_rows["dup_of"].to_list()) <= test_uids
    assert len(truth["off_domain"] & by["outlier"]) >= 4  # of 6, among ~22 rows dropped as outliers
    assert m.filter(pl.col("reason") == "label_issue")["suggested_label"].null_count() == 0
    assert "score_aesthetic" in m.columns and m["score_aesthetic"].null_count() == 0
    info = read_run_info(run_dir)
    notes = {s["scorer"]: s for s in info["steps"]}
    assert notes["leak"]["exact_hash_matches"] == 3
    assert sum(notes["leak"]["leaked_by_eval_source"].values()) == len(truth["leak"])
    assert set(notes["quality"]["thresholds"]) >= {"tiny", "blurry", "dark"}

    from pipeline.report import write_report

    page = write_report(run_dir, grid_size=8).read_text()
    gallery = page[page.index("<section id='check-galleries'>"):]
    for reason in ("low_quality", "leak", "outlier", "label_issue"):
        assert f"data-reason='{reason}'" in gallery
    assert "copies eval" in gallery and " → " in gallery and "data-step='outlier'" in gallery  # threshold band


def test_head_refuses_a_head_of_another_embedder(planted, tmp_path):
    from safetensors.numpy import save_file

    root, _ = planted
    head = tmp_path / "h.safetensors"
    save_file({"weight": np.zeros((1, 64), np.float32), "bias": np.zeros(1, np.float32)}, str(head),
              metadata={"embedder": "ViT-L-14/openai"})
    with pytest.raises(ValueError, match="expects embeddings of ViT-L-14/openai"):
        _run({"name": "h", "source": {"kind": "image_folder", "root": str(root / "test")},
              "embed": {"kind": "pixels", "num_workers": 0}, "index": {"k": 3},
              "steps": [{"scorer": "head", "path": str(head), "name": "aesthetic"}],
              "output_root": str(tmp_path / "runs"), "report": False})


def test_clip_score_and_label_agreement_with_the_text_tower(tiny_clip_model, cifar_subset, tmp_path):
    images = sorted((cifar_subset / "test").rglob("*.jpg"))[:60]
    table = tmp_path / "t.parquet"
    pl.DataFrame({
        "path": [str(p) for p in images],
        "label": [p.parent.name for p in images],
        "caption": [f"a photo of a {p.parent.name}" if i % 5 else None for i, p in enumerate(images)],
    }).write_parquet(table)
    run_dir = _run({
        "name": "clip",
        "source": {"kind": "table", "path": str(table), "label_column": "label", "caption_column": "caption"},
        "embed": {"kind": "clip", "model": tiny_clip_model, "pretrained": None, "num_workers": 0, "device": "cpu", "dtype": "float32"},
        "index": {"k": 3},
        "steps": [{"scorer": "clip_score", "keep_fraction": 0.5}, {"scorer": "label_agreement", "top_k": 3}],
        "output_root": str(tmp_path / "runs"),
        "report": False,
    })
    m = read_manifest(run_dir)
    with_caption = m.filter(pl.col("caption").is_not_null())
    assert with_caption["score_clip"].null_count() == 0 and not with_caption["score_clip"].is_nan().any()
    assert m.filter(pl.col("caption").is_null())["score_clip"].null_count() == 12  # no caption: unscored (null), kept
    assert m.filter(pl.col("reason") == "clip_score").height == 30
    assert m.filter(pl.col("caption").is_null())["keep"].all()
    dropped = m.filter(pl.col("reason") == "clip_score")["score_clip"].max()
    assert dropped <= m.filter(pl.col("keep") & pl.col("caption").is_not_null())["score_clip"].min()
    mism = m.filter(pl.col("reason") == "label_mismatch")
    assert (mism["score_label_rank"] >= 3).all() and mism["suggested_label"].null_count() == 0


def test_an_empty_eval_source_is_refused_before_embedding(tmp_path, cifar_subset):
    from pipeline.config import check_targets

    (tmp_path / "empty").mkdir()
    cfg = CurateConfig.model_validate({
        "name": "e", "source": {"kind": "image_folder", "root": str(cifar_subset / "test")},
        "embed": {"kind": "pixels"}, "output_root": str(tmp_path / "runs"),
        "steps": [{"scorer": "leak", "eval_sources": [{"kind": "image_folder", "root": str(cifar_subset / "test")},
                                                      {"kind": "image_folder", "root": str(tmp_path / "empty")}]}],
    })
    with pytest.raises(ValueError, match="eval source .* is empty"):
        check_targets(cfg)


def _laion_files(root: Path, image: np.ndarray, text: np.ndarray | None) -> dict:
    """One shard of the LAION layout written as real files: img_emb/, metadata/ (key, caption), text_emb/ when given."""
    for sub in ("img_emb", "metadata", "text_emb"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0000.npy", image)
    keys = [f"k{i:04d}" for i in range(len(image))]
    pl.DataFrame({"key": keys, "caption": [f"caption {k}" for k in keys]}).write_parquet(root / "metadata" / "metadata_0000.parquet")
    spec = {"kind": "precomputed", "emb_paths": str(root / "img_emb" / "*.npy"), "meta_paths": str(root / "metadata" / "*.parquet"),
            "caption_column": "caption"}
    if text is not None:
        np.save(root / "text_emb" / "text_emb_0000.npy", text)
        spec["text_emb_paths"] = str(root / "text_emb" / "*.npy")
    return spec


def test_clip_score_reads_the_text_embeddings_a_precomputed_source_ships(tmp_path):
    # Captions that describe their image: text = image + small noise; 20 planted mismatched captions: random text rows.
    rng = np.random.default_rng(3)
    n, d = 200, 32
    image = rng.standard_normal((n, d)).astype(np.float32)
    text = image + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    mismatched = rng.choice(n, 20, replace=False)
    text[mismatched] = rng.standard_normal((20, d))
    no_text = np.setdiff1d(np.arange(n), mismatched)[:5]
    text[no_text] = 0.0  # no caption embedding shipped for these rows
    spec = _laion_files(tmp_path / "laion", image, text)
    base = {"embed": {"kind": "precomputed"}, "index": {"k": 4}, "output_root": str(tmp_path / "runs"), "report": False}
    run_dir = _run({**base, "name": "pre", "source": spec, "steps": [{"scorer": "clip_score", "keep_fraction": 0.9}]})
    m = read_manifest(run_dir).sort("uid")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.einsum("ij,ij->i", unit(image), unit(text))
    has = np.ones(n, bool)
    has[no_text] = False
    score = m["score_clip"].to_numpy()
    np.testing.assert_allclose(score[has], expected[has], atol=2e-3)  # the store holds float16
    assert np.isnan(score[~has]).all() or m["score_clip"].null_count() == len(no_text)
    dropped = {int(u[1:]) for u in m.filter(pl.col("reason") == "clip_score")["uid"].to_list()}
    assert dropped == set(mismatched.tolist())  # keep 90% of 200: exactly the 20 planted
    assert m.filter(pl.col("uid").is_in([f"k{i:04d}" for i in no_text]))["keep"].all()
    note = next(s for s in read_run_info(run_dir)["steps"] if s["scorer"] == "clip_score")
    assert note["text_embeddings"] == "source" and note["captions"] == n - len(no_text)
    # asking for the text tower on a precomputed run, or for shipped text embeddings where there are none: one clear error
    with pytest.raises(ValueError, match="needs the CLIP text tower"):
        _run({**base, "name": "compute", "source": spec,
              "steps": [{"scorer": "clip_score", "keep_fraction": 0.9, "text_embeddings": "compute"}]})
    bare = _laion_files(tmp_path / "bare", image, None)
    with pytest.raises(ValueError, match="text_embeddings: source needs a source that ships caption embeddings"):
        _run({**base, "name": "bare", "source": bare, "steps": [{"scorer": "clip_score", "keep_fraction": 0.9, "text_embeddings": "source"}]})


def test_cli_refuses_text_embeddings_of_another_dimension(tmp_path, capsys):
    from flows.cli import main

    rng = np.random.default_rng(4)
    spec = _laion_files(tmp_path / "laion", rng.standard_normal((30, 16)).astype(np.float32),
                        rng.standard_normal((30, 12)).astype(np.float32))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(__import__("json").dumps({"name": "dim", "source": spec, "embed": {"kind": "precomputed"}, "index": {"k": 2},
                                             "output_root": str(tmp_path / "runs"), "report": False,
                                             "steps": [{"scorer": "clip_score", "keep_fraction": 0.5}]}))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "runs").exists()  # refused before the run started
    assert len(err) == 1 and err[0].startswith("winnow: error:") and "have dim 12, the image embeddings 16" in err[0]


def test_outlier_against_a_target_finds_an_off_domain_group(cifar_subset, tmp_path):
    # 24 near-identical magenta/green checkerboards among 500 CIFAR images: each other's 10 nearest neighbours, so kNN
    # among the pool's own rows ranks them last; against the test split (the target, also leak's eval source: embedded
    # once) they are far from everything.
    shutil.copytree(cifar_subset / "train", tmp_path / "train")
    rng = np.random.default_rng(5)
    squares = ((np.arange(32)[:, None, None] // 8) + (np.arange(32)[None, :, None] // 8)) % 2 == 0
    group = set()
    for j in range(24):
        arr = np.where(squares, np.array([255, 0, 255]), np.array([0, 255, 0])) + rng.normal(0, 6, (32, 32, 3))
        _jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), tmp_path / "train" / "frog" / f"board{j}.jpg")
        group.add(f"frog/board{j}.jpg")
    test = {"kind": "image_folder", "root": str(cifar_subset / "test")}
    run_dir = _run({
        "name": "group", "source": {"kind": "image_folder", "root": str(tmp_path / "train")},
        "embed": {"kind": "pixels", "num_workers": 0, "dtype": "float32"}, "index": {"k": 5},
        "steps": [{"scorer": "leak", "eval_sources": [test]},
                  {"scorer": "outlier", "k": 10, "target": test, "keep_fraction": 0.95}],
        "output_root": str(tmp_path / "runs"), "report": False,
    })
    m = read_manifest(run_dir)
    dropped = set(m.filter(pl.col("reason") == "outlier")["uid"].to_list())
    assert group <= dropped  # all 24, among the 5% (~26 rows) dropped
    note = next(s for s in read_run_info(run_dir)["steps"] if s["scorer"] == "outlier")
    assert note["neighbours_in"] == "target" and note["target_rows"] == 200
    assert len(list((run_dir / "targets").glob("*/store"))) == 1  # the shared source was embedded once
    # the same rows without a target: the group hides in its own neighbourhood
    from pipeline.store import EmbeddingStore
    from scorers.outlier import outlier_scores

    emb, meta = EmbeddingStore(run_dir / "store").load()
    pool_only = outlier_scores(emb, k=10)
    uids = meta["uid"].to_numpy()
    top = set(uids[np.argsort(-pool_only.kth_distance)[:26]])
    assert len(top & group) <= 2


def test_outlier_target_quantile_reads_its_threshold_from_the_target_rows(cifar_subset, tmp_path):
    # No guess of how much of the pool is off-domain: the threshold is the test split's own 99% kth-distance quantile.
    shutil.copytree(cifar_subset / "train", tmp_path / "train")
    rng = np.random.default_rng(6)
    squares = ((np.arange(32)[:, None, None] // 8) + (np.arange(32)[None, :, None] // 8)) % 2 == 0
    for j in range(12):  # the off-domain group of the test above
        arr = np.where(squares, np.array([255, 0, 255]), np.array([0, 255, 0])) + rng.normal(0, 6, (32, 32, 3))
        _jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), tmp_path / "train" / "cat" / f"noise{j}.jpg")
    test = {"kind": "image_folder", "root": str(cifar_subset / "test")}
    step = {"scorer": "outlier", "k": 10, "target": test, "target_quantile": 0.99}
    run_dir = _run({
        "name": "novelty", "source": {"kind": "image_folder", "root": str(tmp_path / "train")},
        "embed": {"kind": "pixels", "num_workers": 0, "dtype": "float32"}, "index": {"k": 5},
        "steps": [step], "output_root": str(tmp_path / "runs"), "report": False,
    })
    m = read_manifest(run_dir)
    dropped = set(m.filter(pl.col("reason") == "outlier")["uid"].to_list())
    m_scores = dict(zip(m["uid"].to_list(), m["score_outlier"].to_list()))
    assert {f"cat/noise{j}.jpg" for j in range(12)} <= dropped, sorted(m_scores.items(), key=lambda kv: -kv[1])[:20]
    assert len(dropped) < 0.1 * m.height  # in-domain photos mostly pass
    note = next(s for s in read_run_info(run_dir)["steps"] if s["scorer"] == "outlier")
    assert note["target_quantile"] == 0.99 and note["threshold"] > 0
    with pytest.raises(ValueError, match="target_quantile needs a target"):
        from scorers.outlier import step_outlier

        step_outlier(None, target_quantile=0.95)
