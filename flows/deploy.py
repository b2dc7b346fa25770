"""Scheduling the curate flow in Prefect: served by this process, or a deployment in a process work pool."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from flows.curate import curate, flow_run_tags
from flows.runners import make_task_runner
from pipeline.config import load_config


def require_api() -> str:
    """The configured Prefect API URL; a ValueError (one line for the user) when none is set."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError("winnow deploy needs a Prefect server: start one (`prefect server start`) and set "
                         "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    return url


def build_deployment(
    config_path: str | Path, *, cron: str | None = None, interval: float | None = None, name: str | None = None,
    pool: str | None = None,
) -> Any:
    """A Prefect deployment of `curate`: parameter `config_path` (the absolute path; the file is read at each run,
    with the typed overrides on top) and a cron or interval schedule.

    The config is validated now, so a bad config fails at deploy time, not at 3 a.m. Served (no pool), the flow
    runs with the config's task runner; a work-pool worker loads the flow from its module, which runs the fan-out
    on threads, so a pool deployment takes runner.kind local only.
    """
    from prefect.types.entrypoint import EntrypointType

    if (cron is None) == (interval is None):
        raise ValueError("give one schedule: --cron or --interval")
    path = Path(config_path).resolve()
    cfg = load_config(path)
    if pool and cfg.runner.kind != "local":
        raise ValueError(f"runner.kind {cfg.runner.kind} cannot go to a work pool (the worker loads the flow with "
                         "local threads); serve it instead: winnow deploy without --pool")
    flow = curate if pool else curate.with_options(task_runner=make_task_runner(cfg.runner))
    return flow.to_deployment(
        name=name or cfg.name,
        cron=cron,
        interval=datetime.timedelta(seconds=interval) if interval is not None else None,
        parameters={"config_path": str(path)},
        description=f"winnow curate from {path}",
        tags=flow_run_tags(cfg),
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,  # a worker imports flows.curate from the installed project
    )


def deploy_curate(
    config_path: str | Path, *, cron: str | None = None, interval: float | None = None, name: str | None = None,
    pool: str | None = None, dry_run: bool = False,
) -> str | None:
    """Serves the deployment (this process registers it and runs each scheduled flow run until stopped) or, with
    `pool`, registers it in that process work pool (created when missing) for `prefect worker start --pool NAME`
    and returns its id. Needs a Prefect server: PREFECT_API_URL."""
    if not dry_run:
        require_api()
    deployment = build_deployment(config_path, cron=cron, interval=interval, name=name, pool=pool)
    schedules = [s.schedule for s in (deployment.schedules or [])]
    where = f"work pool {pool}" if pool else "served by this process"
    print(f"deployment curate/{deployment.name} ({where}): schedules {schedules}")
    if dry_run:
        return None
    if pool:
        _ensure_process_pool(pool)
        deployment_id = str(deployment.apply(work_pool_name=pool))
        print(f"deployment id {deployment_id}; start a worker: prefect worker start --pool {pool}")
        return deployment_id
    from prefect import serve

    serve(deployment)
    return None


def _ensure_process_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"work pool {pool} created (type process)")
            return
        if found.type != "process":
            raise ValueError(f"work pool {pool} is of type {found.type}; winnow deploys to process pools")
