"""Task runners for the curate flow's fan-out, chosen by the config's `runner:` section.

local: Prefect's ThreadPoolTaskRunner. dask: prefect-dask's DaskTaskRunner (a LocalCluster of worker
processes, or an existing scheduler). ray: prefect-ray's RayTaskRunner (local, or an existing cluster).
Worker processes report task states to the same Prefect API as the flow (see `shared_api`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.config import RunnerConfig
from pipeline.progress import counted_fan_out


def make_task_runner(runner: RunnerConfig) -> Any:
    """The Prefect task runner for `runner`; a clear error when its integration is not installed."""
    if runner.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ValueError("runner.kind dask needs prefect-dask: pip install 'winnow[dask]'") from exc
        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": runner.threads_per_worker, "processes": True,
                            "dashboard_address": ":0"}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ValueError("runner.kind ray needs prefect-ray: pip install 'winnow[ray]'") from exc
    if runner.address:
        # a standing cluster has its own size: Ray refuses num_cpus/num_gpus (and other node settings) with an address
        return RayTaskRunner(address=runner.address)
    return RayTaskRunner(init_kwargs={"num_cpus": runner.workers * runner.threads_per_worker, "include_dashboard": False})


@contextmanager
def shared_api(runner: RunnerConfig) -> Iterator[None]:
    """Makes worker processes talk to the flow's Prefect API.

    Without PREFECT_API_URL every Dask or Ray worker process would start an ephemeral server of its own on the
    same SQLite file. When none is configured, one temporary server is started here for the run and its URL is
    put in the environment the workers inherit; a configured API (a `prefect server start`, or the test
    harness's) is exported as is.
    """
    if runner.kind == "local":
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    server = None
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=120)
        url = server.api_url
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server is not None:
            server.stop()


def io_error_only(task, task_run, state) -> bool:
    """Retry transient I/O failures only; a bad config or a duplicate uid fails the same way every time."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


# Inputs are large arrays and open sources: never hash them for Prefect's cache.
io_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=io_error_only)


class Opaque:
    """A task argument Prefect passes through as is.

    Prefect walks every task argument (dicts, lists, dataclasses) looking for futures to wait on: 9 s for a shard's
    100k sample refs. A plain object is not walked. (prefect's own `quote` does the same but reaches Dask workers
    as a bare tuple.)
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


@io_task
def fan_out_call(fn: Callable[..., Any], call: Opaque) -> Any:
    """One unit of fan-out work (a shard, a batch of clusters, a manifest part) on the flow's task runner."""
    return fn(**call.value)


def prefect_fan_out(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """Submits fn(**call) for every call to the flow's task runner and returns the results in order, with one
    progress display for the whole fan-out (pipeline/progress.py)."""
    return counted_fan_out(fn, calls, _submit_all)


def _submit_all(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    name = fn.__name__
    futures = [
        fan_out_call.with_options(name=name, task_run_name=f"{name}-{i}").submit(fn, Opaque(call)) for i, call in enumerate(calls)
    ]
    return [f.result() for f in futures]
