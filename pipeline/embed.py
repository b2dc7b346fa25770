"""Image embedders and the batched embedding loop.

Two embedders share one small protocol (`Embedder`):

* `ClipEmbedder`: an open_clip image tower, from a pretrained tag or a local checkpoint file; bf16 autocast,
  channels-last and inference mode on CUDA, plain fp32 on the CPU.
* `PixelsEmbedder`: resized pixels → PCA → L2-normalised. Needs no weights: the model-free baseline.

`embed_refs` runs one shard through an embedder with a torch DataLoader whose workers read, decode and
preprocess the images, so the main process only runs the encoder. Bad items come back from the workers as a
status (never an exception), and every ref gets a meta row in ref order.

Weights that cannot be reached
------------------------------
open_clip resolves a pretrained tag through huggingface_hub, which, with no network and no `HF_HUB_OFFLINE`,
retries for about 46 s before failing. Setting `HF_HUB_OFFLINE` from here is no fix: huggingface_hub reads it once,
at import. So `ClipEmbedder` resolves the tag itself: a file already in the cache is used without any network call;
otherwise, if offline mode is on, or an HTTP HEAD of the weights file does not get an answer within `probe_timeout`
seconds (DNS included), it raises `WeightsUnavailableError` at once, naming the file to fetch and the config key /
CLI flag that takes a local checkpoint. Only when the host answers does the download start (a large download is
slow, not hung; huggingface_hub's own timeouts apply from there). A HEAD rather than a TCP connect, because
sandboxes and captive proxies accept connections to any address and then never answer.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import multiprocessing
import multiprocessing.context
import os
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.decode import STATUS_OK, decode_image, sha1_hex
from pipeline.device import amp_dtype, select_device

log = logging.getLogger(__name__)

# Statuses embed_refs adds to those of pipeline.decode.
STATUS_IO_ERROR = "io_error"  # read_bytes raised (missing file, permission, network)
STATUS_DECODE_ERROR = "decode_error"  # decode_image itself raised (it should not; kept so a bug never kills a run)
STATUS_PREPROCESS_ERROR = "preprocess_error"  # the embedder's preprocess raised on a decoded image

CHECKPOINT_HINT = (
    "supply a local checkpoint instead: set `embed.checkpoint: /path/to/open_clip_pytorch_model.bin` in the config "
    "(or pass `--checkpoint PATH` on the command line); a state_dict saved with torch.save, an open_clip training "
    "checkpoint or a .safetensors file all work. `embed.pretrained: null` gives random weights, or use `embed.kind: pixels`"
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable right now."""


@runtime_checkable
class Embedder(Protocol):
    """What embed_refs needs from an embedder.

    `preprocess` runs in DataLoader worker processes, so it must be picklable on its own (an attribute holding a
    transform object, not a bound method dragging the model along). `encode` returns float32 rows of unit L2 norm.
    `describe` is JSON-serialisable and stable across runs with the same settings: the store compares it on resume.
    """

    name: str
    dim: int

    def preprocess(self, img: Image.Image) -> torch.Tensor: ...

    def encode(self, batch: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _versions() -> dict[str, str]:
    import PIL

    out = {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return out


def _jsonable(value: Any) -> Any:
    """Tuples → lists, numpy scalars → Python, so describe() equals its own JSON round trip (store.json compares them)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_offline() -> bool:
    """Offline as huggingface_hub sees it (its constant, read at import) or as the environment says now."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _probe_url(url: str, timeout: float) -> str | None:
    """Asks the weights host for `url` (an HTTP HEAD, redirects followed, proxies from the environment honoured).

    Returns None when the host answers in a way a download could succeed with (2xx/3xx, or 401/403 that the
    downloader's credentials may satisfy), else the reason. A bare TCP connect is not enough: sandboxes and
    captive proxies accept connections to any address and never answer. The whole probe, DNS lookup included,
    runs in a daemon thread abandoned after `timeout` (getaddrinfo ignores socket timeouts).
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "winnow-weights-probe"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError as exc:
            outcome.append(None if exc.code in (401, 403) else f"the host answered HTTP {exc.code} {exc.reason}")
        except Exception as exc:  # URLError, TLS errors, timeouts, refused connections
            reason = getattr(exc, "reason", exc)
            outcome.append(f"{type(reason).__name__}: {reason}")

    worker = threading.Thread(target=attempt, daemon=True, name="winnow-weights-probe")
    worker.start()
    worker.join(timeout)
    host = urllib.parse.urlsplit(url).netloc or url
    if not outcome:
        return f"{host} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host} is unreachable ({outcome[0]})"


# ---------------------------------------------------------------------------------------------------------------
# CLIP


def _check_model_name(model_name: str) -> None:
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    available = open_clip.list_models()
    if model_name.replace("/", "-") in available:
        return
    close = difflib.get_close_matches(model_name, available, n=5, cutoff=0.5)
    examples = close or [m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "convnext_base") if m in available]
    raise ValueError(
        f"unknown open_clip model {model_name!r}; {'did you mean' if close else 'available names include'} "
        f"{', '.join(examples)} ({len(available)} names in open_clip.list_models())"
    )


def _tag_preprocess(pcfg: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing a pretrained tag was trained with, as create_model_and_transforms overrides.

    open_clip merges these itself when given a tag; we hand it a local file path instead, so we pass them on.
    """
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation", "resize_mode": "image_resize_mode"}
    return {arg: pcfg[key] for key, arg in keys.items() if pcfg.get(key) is not None}


def _resolve_pretrained(model_name: str, tag: str, *, cache_dir: str | None, probe_timeout: float) -> tuple[str, dict[str, Any]]:
    """A local path for the weights of (model_name, tag), downloading only when the host answers.

    Returns (path, preprocess overrides of the tag). Raises WeightsUnavailableError within about
    `probe_timeout` seconds when the weights are not cached and cannot be fetched.
    """
    import open_clip
    from open_clip import pretrained as oc_pretrained

    if os.path.isfile(tag):  # open_clip also accepts a file path as `pretrained`
        return tag, {}
    pcfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        raise ValueError(
            f"pretrained tag {tag!r} is not known for model {model_name!r} and is not a file; "
            f"known tags: {', '.join(tags) if tags else 'none (use a checkpoint file or pretrained: null)'}"
        )
    overrides = _tag_preprocess(pcfg)
    model_cfg = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    if bool(pcfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        # open_clip warns about this only when it resolves the tag itself
        log.warning("pretrained %s was trained with quick_gelu=%s but model %s has quick_gelu=%s; use the matching "
                    "'-quickgelu' model name", tag, pcfg.get("quick_gelu", False), model_name, model_cfg.get("quick_gelu", False))
    if "file" in pcfg:
        return pcfg["file"], overrides

    hf_hub = pcfg.get("hf_hub", "")
    url = pcfg.get("url", "")
    if hf_hub and oc_pretrained.has_hf_hub():
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        # open_clip prefers a .safetensors twin when the repo has one; look for either in the cache.
        safe_twins = getattr(oc_pretrained, "_get_safe_alternatives", lambda name: ())(filename)  # private in open_clip
        for candidate in [*safe_twins, filename]:
            cached = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached, overrides
        where = f"{hf_constants.ENDPOINT}/{repo_id}/resolve/main/{filename}"
    elif url:
        cached = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(cached):
            return cached, overrides
        where = url
    else:
        raise ValueError(f"pretrained tag {tag!r} of {model_name!r} names no download location")

    reason = "offline mode is on (HF_HUB_OFFLINE)" if _hf_offline() else _probe_url(where, probe_timeout)
    if reason is not None:
        raise WeightsUnavailableError(
            f"pretrained weights {model_name}/{tag} are not in the local cache and cannot be downloaded: {reason}. "
            f"The file is {where} (fetch it on a machine with internet access). To run without downloading, {CHECKPOINT_HINT}."
        )
    log.info("downloading open_clip weights %s/%s from %s", model_name, tag, where)
    try:
        path = oc_pretrained.download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as exc:  # the host answered the probe but the download failed
        raise WeightsUnavailableError(f"downloading {where} failed ({exc}); {CHECKPOINT_HINT}") from exc
    if not path:
        raise WeightsUnavailableError(f"open_clip returned no file for {model_name}/{tag}; {CHECKPOINT_HINT}")
    return path, overrides


class PilToUint8:
    """PIL image → uint8 tensor (C, H, W). Picklable; the float conversion and normalisation happen batched in encode()."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8)  # a copy: Pillow hands out read-only buffers
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1)


def _split_preprocess(preprocess: Any) -> tuple[Any, tuple[float, ...] | None, tuple[float, ...] | None]:
    """Splits open_clip's eval transform into its PIL stages + uint8 output, and the (mean, std) of its Normalize.

    ToTensor + Normalize cost more than the resize for small images and quadruple what crosses from the workers
    (float32 vs uint8), so encode() does them on the whole batch, on the device, with the same float32 operations
    (x / 255, then (x - mean) / std): the result is bit-identical to open_clip's transform. A transform of another
    shape is used as it is (encode() then receives floats).
    """
    from torchvision import transforms as T

    stages = list(getattr(preprocess, "transforms", []))
    if len(stages) >= 2 and isinstance(stages[-2], T.ToTensor) and isinstance(stages[-1], T.Normalize):
        norm = stages[-1]
        mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
        return T.Compose([*stages[:-2], PilToUint8()]), mean, std
    return preprocess, None, None


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    choices = {"auto": "auto", "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}
    if precision not in choices:
        raise ValueError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    chosen = choices[precision]
    if chosen == "auto":
        return amp_dtype(device)
    if chosen is torch.float16 and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use fp32 (or bf16) on the CPU")
    return chosen


class ClipEmbedder:
    """open_clip image tower → L2-normalised float32 embeddings.

    Weights: `checkpoint` (a local file) wins over `pretrained` (an open_clip tag, a file path, or None for random
    weights). Checkpoints load with `torch.load(weights_only=True)` or safetensors: no arbitrary unpickling.
    On CUDA the forward runs under bf16 autocast (fp16 where bf16 is unsupported), channels-last, inference mode;
    on the CPU in fp32. `probe_timeout` bounds how long an unreachable weights host can delay a failure.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        *,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        cache_dir: str | None = None,
        probe_timeout: float = 3.0,
    ) -> None:
        import open_clip

        _check_model_name(model_name)
        self.device = select_device(device)
        self.autocast_dtype = _resolve_precision(precision, self.device)
        self.model_name = model_name
        self.pretrained = None if checkpoint is not None else pretrained
        self.checkpoint = None if checkpoint is None else Path(checkpoint).expanduser().resolve()

        overrides: dict[str, Any] = {}
        weights_path: str | None = None
        if self.checkpoint is not None:
            if model_name.startswith(("hf-hub:", "local-dir:")):
                raise ValueError(f"model {model_name!r} brings its own weights; give a built-in model name with a checkpoint")
            if not self.checkpoint.is_file():
                raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist (embed.checkpoint / --checkpoint)")
            weights_path = str(self.checkpoint)
        elif pretrained and not model_name.startswith(("hf-hub:", "local-dir:")):
            weights_path, overrides = _resolve_pretrained(
                model_name, pretrained, cache_dir=cache_dir, probe_timeout=probe_timeout
            )
        elif model_name.startswith("hf-hub:"):
            from huggingface_hub import constants as hf_constants

            repo_url = f"{hf_constants.ENDPOINT}/{model_name.removeprefix('hf-hub:')}/resolve/main/open_clip_config.json"
            reason = "offline mode is on (HF_HUB_OFFLINE)" if _hf_offline() else _probe_url(repo_url, probe_timeout)
            if reason is not None:
                raise WeightsUnavailableError(f"{model_name} needs the Hugging Face hub: {reason}; {CHECKPOINT_HINT}")
        self.weights_path = weights_path

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights_path, device="cpu", weights_only=True, cache_dir=cache_dir, **overrides
            )
        except Exception as exc:
            if weights_path is None:
                raise
            # wrong architecture (missing/unexpected keys), or a pickle that weights_only=True refuses to run
            raise ValueError(f"could not load weights {weights_path} into {model_name}: {type(exc).__name__}: {exc}") from exc
        model.eval().requires_grad_(False)
        if self.device.type == "cuda":
            # channels-last helps the conv stem (patch embedding / ResNet trunk) on tensor cores
            model = model.to(self.device, memory_format=torch.channels_last)
        else:
            model = model.to(self.device)
        self.model = model
        # A torchvision Compose of picklable pieces (PIL resize/crop → uint8 tensor): shipped to DataLoader workers
        # without the model. open_clip's own transform stays available as `reference_preprocess`.
        self.reference_preprocess = preprocess
        self.preprocess, mean, std = _split_preprocess(preprocess)
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.name = model_name
        self.dim = self._infer_dim()
        self._weights_sha256: str | None = None

    def _infer_dim(self) -> int:
        out_dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(out_dim, int) and out_dim > 0:
            return out_dim
        size = self.model.visual.preprocess_cfg.get("size", 224)
        h, w = (size, size) if isinstance(size, int) else size
        dtype = torch.uint8 if self._mean is not None else torch.float32
        return int(self.encode(torch.zeros(1, 3, h, w, dtype=dtype)).shape[1])

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) images from `preprocess` (uint8) or already normalised floats → (B, dim) float32, unit L2 norm."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ValueError(f"encode expects a (B, 3, H, W) tensor, got {getattr(batch, 'shape', type(batch))}")
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                if self._mean is None or self._std is None:
                    raise ValueError("uint8 batch given, but this model's transform does not end in ToTensor + Normalize")
                x = x.float().div_(255).sub_(self._mean).div_(self._std)  # = ToTensor + Normalize, batched
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.autocast_dtype is None:
                amp: Any = contextlib.nullcontext()
            else:
                amp = torch.autocast(self.device.type, dtype=self.autocast_dtype)
            with amp:
                feats = self.model.encode_image(x)
            # Normalise in fp32: bf16 rounding would leave norms off by ~1e-2.
            feats = F.normalize(feats.float(), dim=-1)
            return feats.cpu().numpy()

    def weights_sha256(self) -> str | None:
        if self.weights_path is None:
            return None
        if self._weights_sha256 is None:
            self._weights_sha256 = file_sha256(self.weights_path)
        return self._weights_sha256

    def describe(self) -> dict[str, Any]:
        """Model, weights identity, dim, preprocessing and versions. The device is left out on purpose: the same
        settings on another GPU give the same store, and store.json is compared on resume."""
        pcfg = dict(getattr(self.model.visual, "preprocess_cfg", {}))
        return _jsonable(
            {
                "kind": "clip",
                "model": self.model_name,
                "pretrained": self.pretrained,
                "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
                "weights_sha256": self.weights_sha256(),
                "dim": self.dim,
                "precision": "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch."),
                "preprocessing": pcfg,
                "versions": _versions(),
            }
        )


# ---------------------------------------------------------------------------------------------------------------
# pixels


class PixelTransform:
    """PIL image → flattened pixels in [0, 1] (float32), after an antialiased resize to size × size."""

    def __init__(self, size: int, grey: bool) -> None:
        self.size = size
        self.grey = grey

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("L" if self.grey else "RGB")
        small = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        arr = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
        return torch.from_numpy(arr)


class PixelsEmbedder:
    """Model-free baseline: resize → flatten pixels in [0, 1] → centre → PCA to `dim` → L2-normalise.

    `fit` learns the mean and the principal axes (exact SVD in float64, deterministic sign convention) from up to
    `fit_samples` images; when given more it keeps a uniform sample drawn with `seed`. `state`/`from_state` save and
    restore the fitted PCA so a resumed run embeds identically.
    """

    name = "pixels"

    def __init__(self, *, size: int = 16, grey: bool = False, dim: int = 64, fit_samples: int = 2000, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        n_pixels = size * size * (1 if grey else 3)
        if not 1 <= dim <= n_pixels:
            raise ValueError(f"dim {dim} must be between 1 and the pixel count {n_pixels} (size {size}, grey={grey})")
        if fit_samples < dim:
            raise ValueError(f"fit_samples {fit_samples} must be >= dim {dim}")
        self.size, self.grey, self.dim, self.fit_samples, self.seed = size, grey, dim, fit_samples, seed
        self.preprocess = PixelTransform(size, grey)
        self.device = torch.device("cpu")
        self._mean: np.ndarray | None = None
        self._components: np.ndarray | None = None
        self.n_fit = 0

    @property
    def is_fitted(self) -> bool:
        return self._components is not None

    def fit(self, images: Iterable[Image.Image]) -> PixelsEmbedder:
        rng = np.random.default_rng(self.seed)
        rows: list[np.ndarray] = []
        for seen, img in enumerate(images):
            vec = self.preprocess(img).numpy()
            if len(rows) < self.fit_samples:
                rows.append(vec)
            else:  # reservoir sampling: a uniform subset of everything seen
                j = int(rng.integers(0, seen + 1))
                if j < self.fit_samples:
                    rows[j] = vec
        if len(rows) < self.dim:
            raise ValueError(f"PCA to dim {self.dim} needs at least {self.dim} images to fit, got {len(rows)}")
        x = np.stack(rows).astype(np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[: self.dim]
        # SVD signs are arbitrary; fix them (largest-magnitude entry positive) so refits agree.
        pivots = comps[np.arange(self.dim), np.abs(comps).argmax(axis=1)]
        comps = comps * np.where(pivots < 0, -1.0, 1.0)[:, None]
        self._mean = mean.astype(np.float32)
        self._components = np.ascontiguousarray(comps, dtype=np.float32)
        self.n_fit = len(rows)
        return self

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if self._components is None or self._mean is None:
            raise RuntimeError("PixelsEmbedder is not fitted: call fit(images) or build it with from_state()")
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        x = x.reshape(len(x), -1).astype(np.float32, copy=False)
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"batch rows have {x.shape[1]} values, the fitted PCA expects {self._mean.shape[0]}")
        return _l2_normalise((x - self._mean) @ self._components.T)

    def state(self) -> dict[str, np.ndarray]:
        if self._components is None or self._mean is None:
            raise RuntimeError("PixelsEmbedder is not fitted; nothing to save")
        return {
            "mean": self._mean.copy(),
            "components": self._components.copy(),
            "size": np.array(self.size),
            "grey": np.array(self.grey),
            "n_fit": np.array(self.n_fit),
            "seed": np.array(self.seed),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PixelsEmbedder:
        missing = {"mean", "components", "size", "grey"} - set(state)
        if missing:
            raise ValueError(f"pixels embedder state lacks {sorted(missing)}")
        comps = np.asarray(state["components"], dtype=np.float32)
        mean = np.asarray(state["mean"], dtype=np.float32)
        size, grey = int(state["size"]), bool(state["grey"])
        if comps.ndim != 2 or mean.shape != (comps.shape[1],) or comps.shape[1] != size * size * (1 if grey else 3):
            raise ValueError(f"inconsistent pixels state: components {comps.shape}, mean {mean.shape}, size {size}, grey {grey}")
        n_fit = int(state.get("n_fit", comps.shape[0]))
        emb = cls(size=size, grey=grey, dim=comps.shape[0], fit_samples=max(n_fit, comps.shape[0]),
                  seed=int(state.get("seed", 0)))
        emb._mean, emb._components, emb.n_fit = mean, np.ascontiguousarray(comps), n_fit
        return emb

    def describe(self) -> dict[str, Any]:
        if self._components is None or self._mean is None:
            raise RuntimeError("describe() needs a fitted PixelsEmbedder (its PCA is part of the result)")
        pca_hash = hashlib.sha256(self._mean.tobytes() + self._components.tobytes()).hexdigest()
        return _jsonable(
            {
                "kind": "pixels",
                "model": "pixels",
                "dim": self.dim,
                "pca_sha256": pca_hash,
                "fit_samples": self.n_fit,
                "preprocessing": {
                    "size": self.size, "grey": self.grey, "resample": "bilinear", "scale": "[0, 1]", "centre": "fit mean",
                },
                "versions": _versions(),
            }
        )


# ---------------------------------------------------------------------------------------------------------------
# the embedding loop


@dataclass
class EmbeddedShard:
    """One shard's result: `meta` has one row per ref in ref order; `embeddings` the rows where `ok_mask` is set."""

    embeddings: np.ndarray
    meta: list[dict[str, Any]]
    ok_mask: np.ndarray
    # seconds: `wait` = the encoder idle waiting for the loader (worker start included), `first_batch` = the part of
    # it before the first batch, `encode` = in encode(); wait − first_batch near 0 means decoding kept up.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return int(self.ok_mask.sum())

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.meta:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


class _RefDataset(Dataset):
    """Reads, decodes and preprocesses one ref per item; failures become a status, never an exception."""

    def __init__(
        self, source: Any, refs: Sequence[Any], preprocess: Callable[[Image.Image], torch.Tensor], max_side: int
    ) -> None:
        self.source, self.refs, self.preprocess, self.max_side = source, refs, preprocess, max_side

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, dict[str, Any]]:
        ref = self.refs[index]
        meta: dict[str, Any] = {
            "uid": ref.uid, "location": ref.location, "label": ref.label, "caption": ref.caption,
            "sha1": None, "width": 0, "height": 0, "status": STATUS_IO_ERROR,  # 0 = unknown, as in DecodeResult
        }
        try:
            data = self.source.read_bytes(ref)
        except Exception as exc:  # OSError in practice; anything else must not kill the worker either
            log.warning("reading %s (%s) failed: %s", ref.uid, ref.location, exc)
            return index, None, meta
        meta["sha1"] = sha1_hex(data)
        try:
            result = decode_image(data, max_side=self.max_side)
        except Exception as exc:
            log.warning("decoding %s raised %s", ref.uid, exc)
            meta["status"] = STATUS_DECODE_ERROR
            return index, None, meta
        meta.update(width=result.width, height=result.height, status=result.status)
        if result.status != STATUS_OK or result.image is None:
            return index, None, meta
        try:
            tensor = self.preprocess(result.image)
        except Exception as exc:
            log.warning("preprocessing %s raised %s", ref.uid, exc)
            meta["status"] = STATUS_PREPROCESS_ERROR
            return index, None, meta
        return index, tensor, meta


def _collate(items: list[tuple[int, torch.Tensor | None, dict[str, Any]]]) -> dict[str, Any]:
    """Keeps every item's meta, stacks only the decodable ones (a dict: DataLoader pins the tensor inside)."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    return {
        "index": [i for i, _, _ in items],
        "meta": [m for _, _, m in items],
        "ok_index": [i for i, _ in ok],
        "pixels": torch.stack([t for _, t in ok]) if ok else None,
    }


def _worker_init(_: int) -> None:
    # torch already gives each worker one intra-op thread; said here too because it is what keeps the
    # workers' tensor ops (ToTensor, Normalize) from competing with the encoder's threads in the main process.
    torch.set_num_threads(1)


def _modules_of(*objects: Any) -> list[str]:
    """The modules defining the classes of `objects` and of the stages inside a torchvision Compose."""
    found: list[str] = []
    for obj in objects:
        for part in [obj, *getattr(obj, "transforms", [])]:
            is_function = isinstance(part, (types.FunctionType, functools.partial))
            module = getattr(part if is_function else type(part), "__module__", None)
            if isinstance(part, functools.partial):
                module = getattr(part.func, "__module__", None)
            if module and module not in found and module != "builtins":
                found.append(module)
    return found


def _worker_context(*shipped: Any) -> multiprocessing.context.BaseContext:
    """Workers start from a clean forkserver process, never by forking this one.

    The caller is often a Prefect task: forking a process that runs Prefect's threads and event loop copies
    their locks and signal handlers into the child (seen here: every forked worker exited with code 1 inside
    a flow run). The server imports, once, what each worker would otherwise import again on every start:
    `__main__` (multiprocessing re-runs the main script in each child unless the server has it), torch, Pillow,
    and the modules whose objects the workers unpickle (`shipped`: the source and the preprocess transform, e.g.
    open_clip). Without that, every embed_refs call paid seconds of imports per worker (measured: 9-12 s to the
    first batch with the CLIP transform on a loaded 2-core machine, 0.4 s with it). The preload list only counts
    when the server starts, i.e. at the first call in a process.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "PIL.Image", "pipeline.embed", *_modules_of(*shipped)])
    return ctx


def embed_refs(
    source: Any,
    refs: Sequence[Any],
    embedder: Embedder,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    max_side: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> EmbeddedShard:
    """Embeds `refs` read from `source`; undecodable items are recorded in meta with their status and skipped.

    `progress`, when given, is called after each batch with the number of refs that batch finished (so a
    `tqdm.update` fits). `pin_memory=None` pins on CUDA. `num_workers=0` decodes in this process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if getattr(embedder, "is_fitted", True) is False:
        raise ValueError(f"embedder {embedder.name!r} is not fitted; fit it (or load its state) before embed_refs")
    n, dim = len(refs), int(embedder.dim)
    device = torch.device(getattr(embedder, "device", "cpu"))
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    if n == 0:
        timings = {"wait": 0.0, "first_batch": 0.0, "encode": 0.0, "total": 0.0}
        return EmbeddedShard(np.zeros((0, dim), np.float32), [], np.zeros(0, bool), timings)

    loader = DataLoader(
        _RefDataset(source, refs, embedder.preprocess, max_side),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        multiprocessing_context=_worker_context(source, embedder.preprocess) if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,  # a few batches in hand to cover uneven decode times
    )
    out = np.empty((n, dim), np.float32)
    ok_mask = np.zeros(n, bool)
    meta: list[dict[str, Any] | None] = [None] * n
    wait = encode = 0.0
    first: float | None = None
    start = mark = time.perf_counter()
    for batch in loader:
        now = time.perf_counter()
        wait += now - mark
        if first is None:
            first = now - start
        for i, row in zip(batch["index"], batch["meta"]):
            meta[i] = row
        if batch["pixels"] is not None:
            vecs = embedder.encode(batch["pixels"])
            encode += time.perf_counter() - now
            idx = np.asarray(batch["ok_index"])
            if vecs.shape != (len(idx), dim):
                raise RuntimeError(f"embedder {embedder.name!r} returned {vecs.shape} for a batch of {len(idx)} (dim {dim})")
            out[idx] = vecs
            ok_mask[idx] = True
        if progress is not None:
            progress(len(batch["index"]))
        mark = time.perf_counter()
    timings = {"wait": wait, "first_batch": first or 0.0, "encode": encode, "total": time.perf_counter() - start}
    missing = [i for i, row in enumerate(meta) if row is None]
    if missing:  # cannot happen with an in-order DataLoader; guards the row alignment the store relies on
        raise RuntimeError(f"embedding loop lost {len(missing)} refs (first index {missing[0]})")
    rows: list[dict[str, Any]] = meta  # type: ignore[assignment]  (no None left, checked above)
    return EmbeddedShard(embeddings=np.ascontiguousarray(out[ok_mask]), meta=rows, ok_mask=ok_mask, timings=timings)
