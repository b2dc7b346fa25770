"""Scheduling the curate flow in Prefect."""
from __future__ import annotations

from pathlib import Path

from flows.curate import curate
from flows.runners import make_task_runner
from pipeline.config import load_config


def build_deployment(config_path: str | Path, *, cron: str, name: str | None = None):
    """A Prefect deployment of `curate` with the config as its parameter and a cron schedule.

    The config is validated now, so a bad config fails at deploy time, not at 3 a.m.
    """
    cfg = load_config(config_path)
    # serve() runs the flow in this process: the config's task runner goes with it (a Dask scheduler address or a
    # Ray cluster for scale-out; Dask and Ray workers need PREFECT_API_URL, which serving requires anyway)
    return curate.with_options(task_runner=make_task_runner(cfg.runner)).to_deployment(
        name=name or cfg.name,
        cron=cron,
        parameters={"config": cfg.model_dump(mode="json")},
        description=f"winnow curate from {config_path}",
        tags=["winnow"],
    )


def serve_curate(config_path: str | Path, *, cron: str, name: str | None = None, dry_run: bool = False) -> None:
    """Serves the deployment: this process registers the schedule and runs each scheduled flow run.

    Needs a running Prefect server (`prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api);
    the ephemeral server of `winnow run` lives only as long as one command.
    """
    from prefect import serve

    deployment = build_deployment(config_path, cron=cron, name=name)
    schedules = [s.schedule for s in (deployment.schedules or [])]
    print(f"deployment curate/{deployment.name}: schedules {schedules}")
    if dry_run:
        return
    serve(deployment)
