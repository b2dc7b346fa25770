"""The `distill` Prefect flow: thin tasks over pipeline.distill (load real data, distil sets, evaluate, write)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import distill as dd
from scorers.device import select_device
from pipeline.manifest import read_run_info

# Inputs are arrays and tensors: never hash them for Prefect's cache.
distill_task = task(cache_policy=NO_CACHE)


@distill_task
def load_real(cfg: dd.DistillConfig) -> dd.ImageData | dd.EmbeddingData:
    data = dd.load_data(cfg)
    get_run_logger().info("distill: real data %s, %d classes, pool %d, test %d", data.description.get("kind"),
                          data.n_classes, len(data.y_train), len(data.y_test))
    return data


@distill_task
def synthesise(cfg: dd.DistillConfig, data: dd.ImageData | dd.EmbeddingData, set_index: int, device: str) -> dd.SynSet:
    logger = get_run_logger()
    every = max(1, cfg.iterations // 10)

    def progress(it: int, loss: float) -> None:
        if it % every == 0 or it == cfg.iterations - 1:
            logger.info("distill set %d: iteration %d/%d, loss per class %.4f", set_index, it + 1, cfg.iterations, loss)

    syn = dd.synthesise(cfg, data, set_index, device=select_device(device), progress=progress)
    logger.info("distill set %d: %s, %d samples in %.1f s", set_index, cfg.method_label, len(syn.y), syn.seconds)
    return syn


@distill_task
def evaluate(cfg: dd.DistillConfig, data: dd.ImageData | dd.EmbeddingData, sets: list[dd.SynSet], device: str) -> dict[str, Any]:
    result = dd.evaluate(cfg, data, sets, device=select_device(device))
    if result.get("enabled"):
        msg = "evaluate: synthetic %.4f ± %.4f (n=%d)" % (result["synthetic"]["mean"], result["synthetic"]["std"],
                                                          result["synthetic"]["n"])
        if "random_real" in result:
            msg += ", random real %.4f ± %.4f" % (result["random_real"]["mean"], result["random_real"]["std"])
        get_run_logger().info(msg)
    return result


@distill_task
def write(cfg: dd.DistillConfig, data: dd.ImageData | dd.EmbeddingData, syn: dd.SynSet, evaluation: dict[str, Any],
          timings: dict[str, float], device: str) -> str:
    path = dd.write_outputs(cfg, data, syn, evaluation=evaluation, timings=timings, device=device)
    get_run_logger().info("distill: manifest %s", path)
    return str(path)


@flow(name="distill", log_prints=True)
def distill(config: dict[str, Any]) -> dict[str, Any]:
    """Synthesises a small training set (DM, DM+flip (FYI), NCFM-style CF matching in pixels or on embeddings),
    evaluates it against random real subsets of the same size, and writes it with its own manifest.

    `config` is the distill YAML as a mapping (pipeline/distill.py DistillConfig), validated before any work.
    Returns run.json's content.
    """
    cfg = dd.DistillConfig.model_validate(config)
    device = str(select_device(cfg.device))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_real(cfg)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sets = [synthesise(cfg, data, k, device) for k in range(cfg.n_sets)]
    timings["distill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluation = evaluate(cfg, data, sets, device)
    evaluation.pop("seconds", None)
    timings["evaluate"] = time.perf_counter() - t0
    path = write(cfg, data, sets[0], evaluation, timings, device)
    return read_run_info(Path(path).parent)
