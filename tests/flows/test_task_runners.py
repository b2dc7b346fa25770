"""Which Prefect task runner a config's `runner:` section gives (the e2e runs are in tests/e2e/test_runners.py)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.runners import Opaque, make_task_runner
from pipeline.config import CurateConfig, RunnerConfig


def test_local_is_a_thread_pool_of_the_configured_size():
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = make_task_runner(RunnerConfig(kind="local", workers=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_dask_builds_a_local_cluster_or_joins_a_scheduler():
    prefect_dask = pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (extra: dask)")
    local = make_task_runner(RunnerConfig(kind="dask", workers=2, threads_per_worker=2))
    assert isinstance(local, prefect_dask.DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["threads_per_worker"] == 2
    remote = make_task_runner(RunnerConfig(kind="dask", address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786"


def test_ray_local_or_remote():
    prefect_ray = pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (extra: ray)")
    local = make_task_runner(RunnerConfig(kind="ray", workers=2))
    assert isinstance(local, prefect_ray.RayTaskRunner) and local.init_kwargs["num_cpus"] == 2
    remote = make_task_runner(RunnerConfig(kind="ray", address="ray://head:10001", workers=4))
    # ray.init refuses num_cpus/num_gpus with an address (a standing cluster has its own size)
    assert remote.address == "ray://head:10001" and "num_cpus" not in remote.init_kwargs and "num_gpus" not in remote.init_kwargs


def test_bad_runner_settings_are_config_errors():
    base = {"source": {"kind": "image_folder", "root": "x"}}
    with pytest.raises(ValidationError, match="kind"):
        CurateConfig.model_validate({**base, "runner": {"kind": "spark"}})
    with pytest.raises(ValidationError, match="workers"):
        CurateConfig.model_validate({**base, "runner": {"kind": "dask", "workers": 0}})
    assert CurateConfig.model_validate(base).runner == RunnerConfig(kind="local", workers=1)


def test_opaque_arguments_survive_pickling():
    import pickle

    box = pickle.loads(pickle.dumps(Opaque({"refs": list(range(5))})))
    assert box.value == {"refs": [0, 1, 2, 3, 4]}
