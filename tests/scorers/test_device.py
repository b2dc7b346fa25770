"""Device selection, autocast dtype and the faiss GPU check (CPU machine; CUDA-only checks skip)."""
from __future__ import annotations

import logging

import pytest
import torch

from scorers.device import amp_dtype, faiss_gpu_available, select_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_is_always_available() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


def test_auto_matches_what_torch_sees() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device().type == expected


def test_auto_falls_back_to_cpu_with_a_log_line(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The one place a patch is acceptable: pretend no GPU is visible to exercise the selection logic.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="scorers.device"):
        assert select_device("auto") == torch.device("cpu")
    assert any("CPU" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "CUDA:1"])
def test_explicit_cuda_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch, requested: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device(requested)


@pytest.mark.parametrize("requested", ["gpu", "cuda:", "cuda:x", "mps:0", ""])
def test_unknown_device_strings_are_rejected(requested: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(requested)


def test_non_string_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        select_device(0)  # type: ignore[arg-type]


def test_cpu_runs_in_fp32() -> None:
    assert amp_dtype(torch.device("cpu")) is None
    assert amp_dtype("cpu") is None


@needs_cuda
def test_cuda_selection_and_bf16() -> None:
    dev = select_device("cuda:0")
    assert dev == torch.device("cuda", 0)
    assert amp_dtype(dev) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    with pytest.raises(RuntimeError, match="visible"):
        select_device(f"cuda:{torch.cuda.device_count()}")


def test_faiss_gpu_check_agrees_with_faiss() -> None:
    faiss = pytest.importorskip("faiss")
    expected = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    assert faiss_gpu_available() is expected


def test_faiss_without_gpu_symbols_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    faiss = pytest.importorskip("faiss")
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert faiss_gpu_available() is False
