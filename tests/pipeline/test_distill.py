"""Distillation on real Fashion-MNIST at toy scale: the matching loss goes down, runs are deterministic in the seed,
outputs (PNGs, manifest, embedding store) are valid and readable by the training-loop adapter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from pipeline import distill as dd
from pipeline.loader import ManifestDataset
from pipeline.manifest import read_manifest, read_run_info
from pipeline.store import EmbeddingStore, StoreInfo
from scorers.distill import cf_loss, convnet, dm_loss, flip_concat, sample_frequencies

TINY = dict(ipc=2, batch_real=16, width=8, depth=2, num_freqs=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(shared_data: Path) -> dd.ImageData:
    data = dd.load_npz("fashion_mnist", shared_data, per_class=30, test_limit=300, seed=0)
    # four classes keep every test below a second or two
    keep_train, keep_test = data.y_train < 4, data.y_test < 4
    return dd.ImageData(data.x_train[keep_train], data.y_train[keep_train], data.x_test[keep_test],
                        data.y_test[keep_test], data.classes[:4], data.description)


def _fixed_objective(data: dd.ImageData, images_u8: np.ndarray, labels: np.ndarray, *, method: str, flip: bool) -> float:
    """The matching loss of a set on a fixed panel of networks and the whole class pools (no augmentation)."""
    mean, std = data.mean_std()
    real = dd.to_tensor(data.x_train, mean, std)
    syn = dd.to_tensor(images_u8, mean, std)
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for k in range(6):
            net = convnet(1, data.n_classes, width=TINY["width"], depth=TINY["depth"], image_size=28, seed=1000 + k)
            for c in range(data.n_classes):
                s = syn[labels == c]
                s = flip_concat(s) if flip else s
                fr, fs = net.embed(real[data.y_train == c]), net.embed(s)
                if method == "dm":
                    total += float(dm_loss(fr, fs))
                else:
                    total += float(cf_loss(fr, fs, t=sample_frequencies(256, fr.shape[1], generator=gen)))
    return total


@pytest.mark.parametrize("method,flip,optimizer,lr", [("dm", False, "sgd", 1.0), ("dm", True, "sgd", 1.0),
                                                      ("ncfm", False, "adam", 0.05)])
def test_matching_loss_decreases(fmnist: dd.ImageData, method: str, flip: bool, optimizer: str, lr: float) -> None:
    syn = dd.distill_pixels(fmnist, method=method, flip=flip, iterations=25, dsa=False, optimizer=optimizer,
                            lr_img=lr, seed=0, **TINY)
    before = _fixed_objective(fmnist, fmnist.x_train[syn.init_indices], syn.y, method=method, flip=flip)
    after = _fixed_objective(fmnist, syn.x, syn.y, method=method, flip=flip)
    assert after < (0.8 if method == "dm" else 0.9) * before, (before, after)
    assert np.mean(syn.losses[-5:]) < np.mean(syn.losses[:5])
    assert syn.x.dtype == np.uint8 and syn.x.shape == (4 * TINY["ipc"], 28, 28, 1)
    assert not np.array_equal(syn.x, fmnist.x_train[syn.init_indices])  # the images moved
    np.testing.assert_array_equal(syn.y, np.repeat(np.arange(4), TINY["ipc"]))
    np.testing.assert_array_equal(fmnist.y_train[syn.init_indices], syn.y)  # initialised from real images of the class


def test_same_seed_same_set_other_seed_other_set(fmnist: dd.ImageData) -> None:
    kw = dict(method="ncfm", iterations=3, optimizer="adam", lr_img=0.05, **TINY)
    a = dd.distill_pixels(fmnist, seed=7, **kw)
    b = dd.distill_pixels(fmnist, seed=7, **kw)
    c = dd.distill_pixels(fmnist, seed=8, **kw)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.losses == b.losses
    # the random real baseline with the same seed is exactly the distilled set's starting point (paired comparison)
    np.testing.assert_array_equal(dd.random_real_subset(fmnist, ipc=TINY["ipc"], seed=7).init_indices, a.init_indices)
    assert not np.array_equal(a.x, c.x)
    mean, std = fmnist.mean_std()
    acc = [dd.train_and_test(a.x, a.y, fmnist.x_test, fmnist.y_test, n_classes=4, mean=mean, std=std, width=8, depth=2,
                             epochs=3, seed=1) for _ in range(2)]
    assert acc[0] == acc[1]


def test_evaluation_beats_chance_on_real_subsets(fmnist: dd.ImageData) -> None:
    mean, std = fmnist.mean_std()
    real = dd.random_real_subset(fmnist, ipc=10, seed=0)
    assert sorted(np.bincount(real.y).tolist()) == [10] * 4
    acc = dd.train_and_test(real.x, real.y, fmnist.x_test, fmnist.y_test, n_classes=4, mean=mean, std=std, width=16,
                            depth=2, epochs=30, seed=0)
    assert 0.45 < acc <= 1.0  # 4 classes: chance is 0.25


def test_pixel_outputs_are_valid_and_loadable(fmnist: dd.ImageData, tmp_path: Path) -> None:
    syn = dd.distill_pixels(fmnist, method="dm", iterations=2, seed=0, **TINY)
    run_dir = tmp_path / "run"
    dd.write_pixel_set(run_dir, syn, fmnist.classes, method="dm+flip", run_info={"method": "dm+flip"})
    m = read_manifest(run_dir)
    slugs = dd.class_slugs(fmnist.classes)
    assert slugs[0] == "T_shirt_top"  # "T-shirt/top" made file- and uid-safe
    assert m["uid"].to_list() == [f"syn-{slugs[c]}-{i}" for c in range(4) for i in range(TINY["ipc"])]
    assert m["keep"].all() and (m["weight"] == 1.0).all() and (m["cluster"] == -1).all()
    assert set(m["reason"].to_list()) == {"synthetic"} and set(m["method"].to_list()) == {"dm+flip"}
    for row, img in zip(m.iter_rows(named=True), syn.x):
        path = Path(row["location"])
        assert path.parent.parent == (run_dir / "images").resolve() and path.name == row["uid"] + ".png"
        np.testing.assert_array_equal(np.asarray(Image.open(path)), img[..., 0])  # lossless
    info = read_run_info(run_dir)
    assert info["config"]["source"]["kind"] == "image_folder"
    ds = ManifestDataset(run_dir)
    assert len(ds) == len(syn.y) and ds.classes == sorted(fmnist.classes)
    image, target, weight = ds[0]
    assert image.size == (28, 28) and weight == 1.0
    assert ds.classes[target] == m.sort("uid")["label"][0]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ncfm_embedding"):
        dd.DistillConfig.model_validate({"data": {"kind": "npz", "name": "cifar10"}, "method": "ncfm_embedding"})
    with pytest.raises(ValueError, match="needs data.name"):
        dd.DistillConfig.model_validate({"data": {"kind": "npz"}})
    with pytest.raises(ValueError, match="flip"):
        dd.DistillConfig.model_validate({"data": {"kind": "store", "root": "x"}, "method": "ncfm_embedding", "flip": True})
    with pytest.raises(ValueError, match="extra"):
        dd.DistillConfig.model_validate({"data": {"kind": "npz", "name": "cifar10"}, "iterationz": 3})
    cfg = dd.DistillConfig.model_validate({"data": {"kind": "npz", "name": "cifar10"}, "method": "ncfm"})
    assert (cfg.resolved_optimizer, cfg.resolved_lr) == ("adam", 0.01)
    cfg = dd.DistillConfig.model_validate({"data": {"kind": "npz", "name": "cifar10"}})
    assert (cfg.resolved_optimizer, cfg.resolved_lr, cfg.method_label) == ("sgd", 1.0, "dm")


def _pixel_feature_store(data: dd.ImageData, root: Path) -> Path:
    """Real Fashion-MNIST rows as unit 32-d embeddings (a fixed random projection of the pixels) in a real store."""
    rng = np.random.default_rng(0)
    x = np.concatenate([data.x_train, data.x_test]).reshape(-1, 28 * 28).astype(np.float32) / 255.0
    y = np.concatenate([data.y_train, data.y_test])
    emb = (x - x.mean(0)) @ rng.standard_normal((28 * 28, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    store = EmbeddingStore(root)
    store.init(StoreInfo(dim=32, dtype="float32", embedder={"kind": "pixel_projection"}, source={"kind": "test"},
                         shard_size=len(y), n_shards=1))
    meta = [{"uid": f"fm-{i}", "location": None, "label": data.classes[lab], "caption": None, "sha1": None,
             "width": 28, "height": 28, "status": "ok"} for i, lab in enumerate(y)]
    store.write_shard(0, emb, meta)
    return root


def test_embedding_cf_distillation_writes_a_store(fmnist: dd.ImageData, tmp_path: Path) -> None:
    root = _pixel_feature_store(fmnist, tmp_path / "src_store")
    cfg = dd.DistillConfig.model_validate({
        "name": "emb", "output_root": str(tmp_path / "runs"), "method": "ncfm_embedding", "ipc": 3, "iterations": 30,
        "batch_real": 32, "cf": {"num_freqs": 128}, "data": {"kind": "store", "root": str(root)},
        "eval": {"n_nets": 2, "probe_steps": 100}, "seed": 0, "device": "cpu"})
    info = dd.run_distill(cfg)
    assert np.mean(info["loss"]["curve"][-5:]) < np.mean(info["loss"]["curve"][:5])
    ev = info["evaluation"]
    assert ev["synthetic"]["n"] == 2 and ev["random_real"]["n"] == 2
    assert 0.25 < ev["synthetic"]["mean"] <= 1.0  # 4 classes
    out = EmbeddingStore(cfg.run_dir / "store")
    emb, meta = out.load(dtype="float32")
    assert emb.shape == (12, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    m = read_manifest(cfg.run_dir)
    classes = sorted(fmnist.classes)  # a store's classes are its sorted label strings
    assert m["uid"].to_list() == meta["uid"].to_list() == dd.synthetic_uids(classes, np.repeat(np.arange(4), 3))
    assert info["classes"] == classes
    assert m["location"].null_count() == 12 and m.filter(pl.col("reason") == "synthetic").height == 12
    # a rerun replaces the set (same seed, same result)
    dd.run_distill(cfg)
    np.testing.assert_array_equal(EmbeddingStore(cfg.run_dir / "store").load(dtype="float32")[0], emb)


def test_image_folder_source_end_to_end(cifar_subset: Path, tmp_path: Path) -> None:
    """A plain image folder (real CIFAR-10 JPEGs, train/test class folders) distils like the npz data."""
    cfg = dd.DistillConfig.model_validate({
        "name": "folder", "output_root": str(tmp_path / "runs"), "method": "ncfm", "flip": True, "ipc": 1,
        "iterations": 2, "batch_real": 8, "net": {"width": 8, "depth": 2}, "cf": {"num_freqs": 32},
        "data": {"kind": "image_folder", "root": str(cifar_subset), "image_size": 16, "per_class": 10, "test_limit": 50},
        "eval": {"n_nets": 1, "epochs": 2}, "seed": 0, "device": "cpu"})
    info = dd.run_distill(cfg)
    assert info["classes"] == sorted(p.name for p in (cifar_subset / "train").iterdir())
    assert info["data"]["pool"] == 100 and info["data"]["test"] == 50
    m = read_manifest(cfg.run_dir)
    assert m.height == 10 and set(m["method"]) == {"ncfm+flip"}
    assert Image.open(m["location"][0]).size == (16, 16)
