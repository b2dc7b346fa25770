"""Scheduling the curate flow in Prefect."""
from __future__ import annotations

from pathlib import Path

from flows.curate import curate
from pipeline.config import load_config


def build_deployment(config_path: str | Path, *, cron: str, name: str | None = None):
    """A Prefect deployment of `curate` with the config as its parameter and a cron schedule.

    The config is validated now, so a bad config fails at deploy time, not at 3 a.m.
    """
    cfg = load_config(config_path)
    return curate.to_deployment(
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
