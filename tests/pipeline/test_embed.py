"""Embedders and the embedding loop, on the CPU with a real tiny open_clip model and real image files."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embed import (
    ClipEmbedder,
    EmbeddedShard,
    Embedder,
    PixelsEmbedder,
    WeightsUnavailableError,
    embed_refs,
)
from pipeline.sources import ImageFolderSource

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- fixtures
def _synthetic_image(rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A smooth random colour field plus noise: varied enough that images differ, JPEG-friendly."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-120, 120, (2, 3))
    pix = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real JPEG/PNG files plus bad ones: a zero-byte .jpg, a text file named .jpg, a truncated JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(7)
    for i in range(14):
        ext = "png" if i % 5 == 0 else "jpg"
        _synthetic_image(rng, size=30 + 3 * i).save(root / f"img_{i:02d}.{ext}")
    (root / "img_03b_empty.jpg").write_bytes(b"")
    (root / "img_07b_text.jpg").write_text("this is not a jpeg, just words\n" * 20)
    good = (root / "img_09.jpg").read_bytes()
    (root / "img_11b_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


BAD = {"img_03b_empty.jpg", "img_07b_text.jpg", "img_11b_truncated.jpg"}


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_model: str) -> ClipEmbedder:
    torch.manual_seed(0)
    return ClipEmbedder(tiny_clip_model, None, device="cpu")


def _batch_from(folder: Path, embedder: Embedder, n: int = 6) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.name not in BAD)[:n]
    return torch.stack([embedder.preprocess(Image.open(p).convert("RGB")) for p in files])


# ---------------------------------------------------------------------------------------------------- CLIP
def test_tiny_clip_satisfies_the_protocol_and_is_picklable_for_workers(tiny_clip: ClipEmbedder) -> None:
    assert isinstance(tiny_clip, Embedder)
    assert tiny_clip.dim == 32
    restored = pickle.loads(pickle.dumps(tiny_clip.preprocess))
    img = Image.new("RGB", (50, 30), (200, 10, 10))
    assert torch.equal(restored(img), tiny_clip.preprocess(img))
    assert tiny_clip.preprocess(img).shape == (3, 64, 64)


def test_uint8_preprocess_matches_open_clips_transform_bit_for_bit(tiny_clip_model: str, tiny_clip: ClipEmbedder,
                                                                   mixed_folder: Path) -> None:
    """Workers ship uint8; encode() normalises the batch. On the reference decode path: the same numbers as
    open_clip's float transform. On the default (cpu) path the resize runs on the uint8 tensor: within 1 grey level."""
    files = sorted(p for p in mixed_folder.iterdir() if p.name not in BAD)[:6]
    images = [Image.open(p).convert("RGB") for p in files]
    exact = ClipEmbedder(tiny_clip_model, None, device="cpu", decode="reference")
    exact.model.load_state_dict(tiny_clip.model.state_dict())
    ours = torch.stack([exact.preprocess(im) for im in images])
    reference = torch.stack([tiny_clip.reference_preprocess(im) for im in images])
    assert ours.dtype == torch.uint8 and reference.dtype == torch.float32
    assert np.array_equal(exact.encode(ours), tiny_clip.encode(reference))
    fast = torch.stack([tiny_clip.preprocess(im) for im in images])
    assert fast.dtype == torch.uint8 and (fast.int() - ours.int()).abs().max() <= 1
    assert (np.sum(tiny_clip.encode(fast) * exact.encode(ours), axis=1) > 0.999).all()


def test_tiny_clip_embeddings_are_unit_norm_and_deterministic(tiny_clip: ClipEmbedder, mixed_folder: Path) -> None:
    batch = _batch_from(mixed_folder, tiny_clip)
    a = tiny_clip.encode(batch)
    b = tiny_clip.encode(batch.clone())
    assert a.dtype == np.float32 and a.shape == (len(batch), 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)
    # distinct images give distinct embeddings (a constant output would also be unit-norm)
    assert np.abs(a[0] - a[1]).max() > 1e-3


def test_tiny_clip_embeddings_do_not_depend_on_batch_size(tiny_clip: ClipEmbedder, mixed_folder: Path) -> None:
    source = ImageFolderSource(mixed_folder)
    refs = source.refs()
    whole = embed_refs(source, refs, tiny_clip, batch_size=64, num_workers=0)
    for bs in (1, 4):
        parts = embed_refs(source, refs, tiny_clip, batch_size=bs, num_workers=0)
        np.testing.assert_allclose(parts.embeddings, whole.embeddings, atol=1e-5)
        assert parts.meta == whole.meta


def test_bf16_autocast_path_stays_close_to_fp32(
    tiny_clip_model: str, tiny_clip: ClipEmbedder, mixed_folder: Path, tmp_path: Path
) -> None:
    """The autocast branch (bf16 on CUDA) run on the CPU: same model, unit norm, nearly the same directions."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    low = ClipEmbedder(tiny_clip_model, None, checkpoint=path, device="cpu", precision="bf16")
    batch = _batch_from(mixed_folder, tiny_clip)
    a, b = tiny_clip.encode(batch), low.encode(batch)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (np.sum(a * b, axis=1) > 0.98).all() and not np.array_equal(a, b)
    assert low.describe()["precision"] == "bfloat16"


def test_bad_precision_is_refused(tiny_clip_model: str) -> None:
    with pytest.raises(ValueError, match="fp16' needs a CUDA"):
        ClipEmbedder(tiny_clip_model, None, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="not one of"):
        ClipEmbedder(tiny_clip_model, None, device="cpu", precision="fp64")


def test_encode_rejects_a_wrong_shape(tiny_clip: ClipEmbedder) -> None:
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny_clip.encode(torch.zeros(3, 64, 64))


def test_checkpoint_file_reloads_bit_identically(
    tiny_clip_model: str, tiny_clip: ClipEmbedder, mixed_folder: Path, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = ClipEmbedder(tiny_clip_model, "laion2b_s34b_b79k", checkpoint=path, device="cpu")  # checkpoint wins over the tag
    batch = _batch_from(mixed_folder, tiny_clip)
    assert np.array_equal(loaded.encode(batch), tiny_clip.encode(batch))
    # ...and a differently initialised model does not (so the equality above says something)
    torch.manual_seed(123)
    other = ClipEmbedder(tiny_clip_model, None, device="cpu")
    assert not np.allclose(other.encode(batch), tiny_clip.encode(batch), atol=1e-3)

    info = loaded.describe()
    assert info["checkpoint"] == str(path.resolve()) and info["pretrained"] is None
    assert info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["dim"] == 32 and info["precision"] == "fp32"
    assert json.loads(json.dumps(info)) == info  # store.json compares it after a JSON round trip


def test_training_checkpoint_and_safetensors_also_load(
    tiny_clip_model: str, tiny_clip: ClipEmbedder, mixed_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state = tiny_clip.model.state_dict()
    train_ckpt = tmp_path / "epoch_3.pt"  # open_clip's training format: module.-prefixed keys under "state_dict"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, train_ckpt)
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    batch = _batch_from(mixed_folder, tiny_clip)
    want = tiny_clip.encode(batch)
    for path in (train_ckpt, st):
        assert np.array_equal(ClipEmbedder(tiny_clip_model, None, checkpoint=path, device="cpu").encode(batch), want)


class _NotWeights:
    """Any class instance in a pickle: weights_only loading must refuse to construct it."""

    def __init__(self) -> None:
        self.payload = "would run code on unpickling"


def test_checkpoint_with_arbitrary_objects_is_refused(
    tiny_clip_model: str, tiny_clip: ClipEmbedder, tmp_path: Path
) -> None:
    path = tmp_path / "sneaky.pt"
    torch.save({"state_dict": tiny_clip.model.state_dict(), "extra": _NotWeights()}, path)
    with pytest.raises(ValueError, match="could not load weights"):
        ClipEmbedder(tiny_clip_model, None, checkpoint=path, device="cpu")


def test_checkpoint_of_another_architecture_is_a_clear_error(
    tiny_clip_model: str, tiny_clip: ClipEmbedder, tmp_path: Path
) -> None:
    path = tmp_path / "visual_only.pt"
    torch.save(tiny_clip.model.visual.state_dict(), path)
    with pytest.raises(ValueError, match=r"could not load weights .*visual_only\.pt"):
        ClipEmbedder(tiny_clip_model, None, checkpoint=path, device="cpu")


def test_missing_checkpoint_file(tiny_clip_model: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipEmbedder(tiny_clip_model, None, checkpoint=tmp_path / "nope.bin", device="cpu")


def test_unknown_model_name_lists_available_names() -> None:
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        ClipEmbedder("ViT-B-33", None, device="cpu")


def test_unknown_pretrained_tag_lists_known_tags(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not known for model 'ViT-B-32'.*laion2b_s34b_b79k"):
        ClipEmbedder("ViT-B-32", "no_such_tag", device="cpu", cache_dir=str(tmp_path))


def test_offline_pretrained_tag_fails_fast_with_checkpoint_hint(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1 for the test process; the cache dir is empty.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    import open_clip  # noqa: F401  (its import time is not what this bounds)

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "embed.checkpoint" in msg and "--checkpoint" not in msg and "HF_HUB_OFFLINE" in msg
    assert "open_clip_pytorch_model.bin" in msg


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A local port that accepts TCP connections and never answers: what a blackholing proxy looks like."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # never accept(): the kernel completes handshakes, nobody ever replies
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture()
def not_found_server() -> Iterator[str]:
    """A local HTTP server that answers 404 to everything."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_probe_reports_silent_refused_and_missing_hosts(silent_server: str, not_found_server: str) -> None:
    from pipeline.embed.clip import _probe_url

    start = time.monotonic()
    assert "did not answer within 1 s" in (_probe_url(f"{silent_server}/w.bin", 1.0) or "")
    assert time.monotonic() - start < 3
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    assert "unreachable" in (_probe_url(f"http://127.0.0.1:{port}/w.bin", 1.0) or "")
    assert "HTTP 404" in (_probe_url(f"{not_found_server}/w.bin", 1.0) or "")


def test_unreachable_hub_without_offline_flag_fails_within_seconds(tmp_path: Path, silent_server: str) -> None:
    """The user's situation: no HF_HUB_OFFLINE, a hub that never answers. open_clip alone would wait ~46 s."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=silent_server, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = textwrap.dedent(
        f"""
        import time
        import open_clip  # imported before the clock starts: the bound is on waiting for the network, not on imports
        from pipeline.embed import ClipEmbedder, WeightsUnavailableError
        t = time.monotonic()
        try:
            ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", device="cpu", probe_timeout=2.0, cache_dir={str(tmp_path / 'c')!r})
        except WeightsUnavailableError as exc:
            print("ELAPSED", time.monotonic() - t)
            print("MESSAGE", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "ELAPSED" in out.stdout, out.stderr[-2000:]
    assert float(out.stdout.split("ELAPSED")[1].split()[0]) < 10
    assert "did not answer" in out.stdout and "embed.checkpoint" in out.stdout


# ---------------------------------------------------------------------------------------------------- pixels
def _images(n: int, seed: int, size: int = 24) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [_synthetic_image(rng, size) for _ in range(n)]


def test_pixels_fit_state_reload_identical(tmp_path: Path) -> None:
    emb = PixelsEmbedder(size=8, dim=12, fit_samples=100, seed=0).fit(_images(60, seed=1))
    assert isinstance(emb, Embedder) and emb.n_fit == 60
    batch = torch.stack([emb.preprocess(im) for im in _images(10, seed=2)])
    before = emb.encode(batch)
    np.savez(tmp_path / "state.npz", **emb.state())  # how the store keeps it (no pickle)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as data:
        again = PixelsEmbedder.from_state({k: data[k] for k in data.files})
    assert np.array_equal(again.encode(batch), before)
    assert again.describe() == emb.describe()
    assert before.dtype == np.float32 and before.shape == (10, 12)
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, atol=1e-5)


def test_pixels_pca_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    images = _images(80, seed=3)
    emb = PixelsEmbedder(size=6, dim=10, fit_samples=200).fit(images)
    x = np.stack([emb.preprocess(im).numpy() for im in images]).astype(np.float64)
    ref = PCA(n_components=10, svd_solver="full").fit(x)
    state = emb.state()
    np.testing.assert_allclose(state["mean"], ref.mean_, atol=1e-6)
    # same axes up to sign; ours have a fixed sign convention
    np.testing.assert_allclose(np.abs(state["components"] @ ref.components_.T), np.eye(10), atol=1e-4)


def test_pixels_fit_keeps_a_seeded_uniform_sample() -> None:
    images = _images(50, seed=4)
    a = PixelsEmbedder(size=6, dim=8, fit_samples=20, seed=0).fit(images)
    b = PixelsEmbedder(size=6, dim=8, fit_samples=20, seed=0).fit(images)
    c = PixelsEmbedder(size=6, dim=8, fit_samples=20, seed=1).fit(images)
    assert a.n_fit == 20
    assert np.array_equal(a.state()["components"], b.state()["components"])
    assert not np.allclose(a.state()["mean"], c.state()["mean"])


def test_pixels_bad_dims_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="pixel count 64"):
        PixelsEmbedder(size=8, grey=True, dim=65)
    with pytest.raises(ValueError, match="at least 30 images"):
        PixelsEmbedder(size=8, dim=30).fit(_images(12, seed=5))
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelsEmbedder(size=8, dim=4).encode(torch.zeros(2, 192))
    with pytest.raises(ValueError, match="inconsistent"):
        PixelsEmbedder.from_state(
            {"mean": np.zeros(10), "components": np.zeros((2, 10)), "size": np.array(8), "grey": np.array(False)}
        )


def test_pixels_similar_images_are_closer_than_different_ones(cifar_subset: Path) -> None:
    files = sorted(cifar_subset.glob("train/*/*.jpg"))
    fit_images = [Image.open(p).convert("RGB") for p in files[::2]]
    emb = PixelsEmbedder(size=16, dim=48).fit(fit_images)
    probes = [Image.open(p).convert("RGB") for p in files[1::35][:20]]
    # a mild change (brighter by 6%, slight blur, a few pixels shifted) of the same photo
    from PIL import ImageEnhance, ImageFilter

    edited = [ImageEnhance.Brightness(im).enhance(1.06).filter(ImageFilter.GaussianBlur(0.6)) for im in probes]
    a = emb.encode(torch.stack([emb.preprocess(im) for im in probes]))
    b = emb.encode(torch.stack([emb.preprocess(im) for im in edited]))
    sims = b @ a.T  # row i: edited i against every original
    assert (sims.argmax(axis=1) == np.arange(len(probes))).all()
    assert np.diag(sims).min() > np.median(sims[~np.eye(len(probes), dtype=bool)])


def test_pixels_grey_works_end_to_end(mixed_folder: Path) -> None:
    source = ImageFolderSource(mixed_folder)
    refs = source.refs()
    images = [Image.open(r.location).convert("RGB") for r in refs if Path(r.location).name not in BAD]
    emb = PixelsEmbedder(size=8, grey=True, dim=6).fit(images)
    shard = embed_refs(source, refs, emb, batch_size=5, num_workers=0)
    assert shard.embeddings.shape == (len(refs) - len(BAD), 6)
    np.testing.assert_allclose(np.linalg.norm(shard.embeddings, axis=1), 1.0, atol=1e-5)


def test_unfitted_pixels_embedder_is_refused_by_embed_refs(mixed_folder: Path) -> None:
    source = ImageFolderSource(mixed_folder)
    with pytest.raises(ValueError, match="not fitted"):
        embed_refs(source, source.refs(), PixelsEmbedder(size=8, dim=4), num_workers=0)


# ---------------------------------------------------------------------------------------------------- embed_refs
def test_embed_refs_records_bad_files_and_keeps_order(tiny_clip: ClipEmbedder, mixed_folder: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(mixed_folder)
    refs = source.refs()
    done: list[int] = []
    shard = embed_refs(source, refs, tiny_clip, batch_size=4, num_workers=2, progress=done.append)
    assert isinstance(shard, EmbeddedShard)
    assert sum(done) == len(refs)
    assert [m["uid"] for m in shard.meta] == [r.uid for r in refs]
    status = {m["uid"]: m["status"] for m in shard.meta}
    assert status["img_03b_empty.jpg"] == "empty"
    assert status["img_07b_text.jpg"] == "not_image"
    assert status["img_11b_truncated.jpg"] == "corrupt"
    assert all(s == "ok" for uid, s in status.items() if uid not in BAD)
    assert shard.ok_mask.tolist() == [r.uid not in BAD for r in refs]
    assert shard.embeddings.shape == (len(refs) - len(BAD), 32) and shard.embeddings.dtype == np.float32
    assert shard.status_counts() == {"ok": len(refs) - 3, "empty": 1, "not_image": 1, "corrupt": 1}
    t = shard.timings
    assert set(t) == {"wait", "first_batch", "encode", "device_decode", "loader_busy", "total", "batches_on_shared_threads"}
    assert 0 < t["encode"] < t["total"] and 0 < t["first_batch"] <= t["wait"] < t["total"]
    assert t["device_decode"] == 0 and 0 < t["loader_busy"]  # cpu decode path: all decoding in the workers
    assert all("_seconds" not in row for row in shard.meta)

    # meta: sha1 of the bytes (also for undecodable files), real sizes for decoded ones
    for ref, row in zip(refs, shard.meta):
        data = Path(ref.location).read_bytes()
        assert row["sha1"] == hashlib.sha1(data).hexdigest()
        assert row["location"] == ref.location and row["label"] == ref.label
        if row["status"] == "ok":
            assert (row["width"], row["height"]) == Image.open(ref.location).size

    # rows are the ok refs in ref order: each equals that image embedded alone
    ok_refs = [r for r in refs if r.uid not in BAD]
    for row, ref in zip(shard.embeddings[::5], ok_refs[::5]):
        alone = tiny_clip.encode(tiny_clip.preprocess(Image.open(ref.location).convert("RGB"))[None])[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)

    # the same shard decoded in this process agrees with the worker processes
    serial = embed_refs(source, refs, tiny_clip, batch_size=4, num_workers=0)
    assert serial.meta == shard.meta
    np.testing.assert_allclose(serial.embeddings, shard.embeddings, atol=1e-6)
    assert np.array_equal(serial.ok_mask, shard.ok_mask)


def test_unreadable_file_is_an_io_error_not_a_crash(tiny_clip: ClipEmbedder, mixed_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vanishing"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes((mixed_folder / "img_01.jpg").read_bytes())
    source = ImageFolderSource(folder)
    refs = source.refs()
    (folder / "b.jpg").unlink()  # listed, then gone before it is read
    for workers in (0, 2):
        shard = embed_refs(source, refs, tiny_clip, batch_size=2, num_workers=workers)
        assert [m["status"] for m in shard.meta] == ["ok", "io_error", "ok"]
        assert shard.meta[1]["sha1"] is None
        assert shard.embeddings.shape == (2, 32)


def test_embed_refs_with_no_refs(tiny_clip: ClipEmbedder, mixed_folder: Path) -> None:
    shard = embed_refs(ImageFolderSource(mixed_folder), [], tiny_clip)
    assert shard.embeddings.shape == (0, 32) and shard.meta == [] and shard.ok_mask.shape == (0,)


def test_embed_refs_rejects_bad_knobs(tiny_clip: ClipEmbedder, mixed_folder: Path) -> None:
    source = ImageFolderSource(mixed_folder)
    with pytest.raises(ValueError, match="batch_size"):
        embed_refs(source, source.refs(), tiny_clip, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        embed_refs(source, source.refs(), tiny_clip, num_workers=-1)



def test_embed_workers_run_outside_this_process_group():
    """A terminal's Ctrl-C reaches every process of its foreground group: the decode workers must not die of it (their
    shard's task would fail before the run knows it is being stopped), so they come from a forkserver that moved to a
    process group of its own."""
    from pipeline.embed.loop import _worker_context

    ctx = _worker_context()
    with ctx.Pool(1) as pool:
        assert pool.apply(os.getpgrp) != os.getpgrp()
