"""Where the compute runs: torch device selection, the autocast dtype, and whether FAISS can use a GPU.

Policy: "auto" takes CUDA when torch sees a GPU and falls back to the CPU with a log line; an explicit
"cuda"/"cuda:N" that cannot be honoured is an error, because a user who asked for the GPU would rather
know than silently run 50x slower.
"""
from __future__ import annotations

import logging
import re

from scorers.lazy import lazy_module

# Imported on first use: step modules import this one, and config validation imports them (scorers/lazy.py).
torch = lazy_module("torch")

log = logging.getLogger(__name__)

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def select_device(requested: str | torch.device = "auto") -> torch.device:
    """Resolves a device request ("auto", "cpu", "cuda", "cuda:N") to a torch.device.

    Raises ValueError for a string that names no supported device and RuntimeError when CUDA is
    requested explicitly but unavailable (or the index is out of range).
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    if not isinstance(requested, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {requested!r}")
    req = requested.strip().lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.info("device 'auto': no CUDA device visible to torch, running on the CPU (fp32)")
        return torch.device("cpu")
    if req == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(req)
    if match is None:
        raise ValueError(f"unknown device {requested!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {requested!r} was requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device: auto or cpu"
        )
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"device {requested!r} was requested but only {count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for inference on `device`: bf16 on CUDA when supported, else fp16; None (= fp32) on CPU.

    CPU autocast to bf16 is slower than fp32 on most CPUs without AMX, and fp32 keeps CPU runs exact.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def faiss_gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU.

    faiss-cpu has no `get_num_gpus` (or returns 0), and a missing faiss is simply "no GPU".
    """
    try:
        import faiss
    except ImportError:
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None:
        return False
    try:
        return int(get_num_gpus()) > 0
    except Exception:  # a GPU build on a machine whose driver is missing raises at call time
        log.debug("faiss.get_num_gpus() failed; treating faiss as CPU-only", exc_info=True)
        return False
