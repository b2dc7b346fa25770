"""The open_clip embedder (`ClipEmbedder`) and the resolution of its pretrained weights.

Weights that cannot be reached
------------------------------
open_clip resolves a pretrained tag through huggingface_hub, which, with no network and no `HF_HUB_OFFLINE`,
retries for about 46 s before failing. Setting `HF_HUB_OFFLINE` from here is no fix: huggingface_hub reads it once,
at import. So `ClipEmbedder` resolves the tag itself: a file already in the cache is used without any network call;
otherwise, if offline mode is on, or an HTTP HEAD of the weights file does not get an answer within `probe_timeout`
seconds (DNS included), it raises `WeightsUnavailableError` at once, naming the file to fetch and the config key
(`embed.checkpoint`) that takes a local checkpoint. Only when the host answers does the download start (a large download is
slow, not hung; huggingface_hub's own timeouts apply from there). A HEAD rather than a TCP connect, because
sandboxes and captive proxies accept connections to any address and then never answer.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scorers.device import amp_dtype, select_device
from pipeline.embed.device_decode import choose_decode_path
from pipeline.embed.common import file_sha256, jsonable, versions

log = logging.getLogger(__name__)

CHECKPOINT_HINT = (
    "supply a local checkpoint instead: set `embed.checkpoint: /path/to/open_clip_pytorch_model.bin` in the config "
    "(README 'First run on your own images' shows how to make one); a state_dict saved with torch.save, an open_clip training "
    "checkpoint or a .safetensors file all work. `embed.pretrained: null` gives random weights, or use `embed.kind: pixels`"
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable right now."""


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


_SILENT = "no answer before the timeout"


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
            # the socket's own timeout can fire just before join() gives up: the same silence, said the same way
            outcome.append(_SILENT if isinstance(reason, TimeoutError) else f"{type(reason).__name__}: {reason}")

    worker = threading.Thread(target=attempt, daemon=True, name="winnow-weights-probe")
    worker.start()
    worker.join(timeout)
    host = urllib.parse.urlsplit(url).netloc or url
    if not outcome or outcome[0] == _SILENT:
        return f"{host} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host} is unreachable ({outcome[0]})"



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


class TensorResizeCrop:
    """PIL RGB image → uint8 tensor (3, size, size): shortest side to `size` (antialiased), then centre crop.

    The geometry of open_clip's Resize(size) + CenterCrop(size), done by torchvision on the uint8 tensor: its
    vectorised uint8 kernels resize ~3.7x faster than Pillow's bicubic here (measured in benchmarks/embed_throughput.py's
    notes) and differ from Pillow by at most 1 grey level. Picklable (runs in DataLoader workers).
    """

    # Imported in __call__ (keeps torchvision out of processes that never embed); the worker forkserver preloads them
    # (pipeline.embed.loop._modules_of): imported in each worker instead, they cost 5-13 s per worker per shard
    # (torchvision pulls in torch._dynamo), measured on the shared 2-core machine.
    worker_imports = ("torchvision.transforms", "torchvision.transforms.v2.functional")

    def __init__(self, size: int, interpolation: str = "bicubic") -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F2

        x = PilToUint8()(img)
        x = F2.resize(x, [self.size], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return F2.center_crop(x, [self.size, self.size])


def _tensor_preprocess(preprocess: Any) -> TensorResizeCrop | None:
    """The fast worker transform for open_clip's default eval transform (Resize(int) + CenterCrop + [MaybeConvertMode]
    + ToTensor + Normalize); None for any other shape (the split PIL transform is used then)."""
    from torchvision import transforms as T

    stages = [s for s in getattr(preprocess, "transforms", []) if type(s).__name__ != "MaybeConvertMode"]
    if len(stages) != 4 or not isinstance(stages[0], T.Resize) or not isinstance(stages[1], T.CenterCrop):
        return None
    if not isinstance(stages[2], T.ToTensor) or not isinstance(stages[3], T.Normalize):
        return None
    resize, crop = stages[0], stages[1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if size is None or list(crop.size) != [size, size] or resize.max_size is not None:
        return None
    return TensorResizeCrop(int(size), resize.interpolation.value)


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
    `decode` picks the decode path (auto, cpu, nvjpeg, reference: see pipeline.embed.device_decode); the resolved
    path is `decode_path` and part of `describe()`.
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
        decode: str = "auto",
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
                raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist (embed.checkpoint)")
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
        pcfg = dict(getattr(model.visual, "preprocess_cfg", {}))
        size = pcfg.get("size", 224)
        self.input_size = int(max(size) if isinstance(size, (tuple, list)) else size)
        self.decode_path = choose_decode_path(decode, self.device, resize_mode=str(pcfg.get("resize_mode", "shortest")))
        # The workers decode no larger than the model's input needs, except on the reference path (open_clip's pixels).
        self.decode_cover = None if self.decode_path == "reference" else self.input_size
        if self.decode_path != "reference" and self._mean is not None:
            self.preprocess = _tensor_preprocess(preprocess) or self.preprocess
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
        return jsonable(
            {
                "kind": "clip",
                "model": self.model_name,
                "pretrained": self.pretrained,
                "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
                "weights_sha256": self.weights_sha256(),
                "dim": self.dim,
                "precision": "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch."),
                "decode": self.decode_path,
                "preprocessing": pcfg,
                "versions": versions(),
            }
        )

