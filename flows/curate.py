"""The `curate` Prefect flow: pipeline.sequence's stage sequence with every stage a named task.

Parameters are typed (the Prefect UI shows a form, `prefect deployment run -p keep_fraction=0.3` works): a config
file path or a whole config, plus explicit overrides merged and validated before any work. Flow runs are named
`<config name>-<UTC timestamp>` and tagged `winnow`, `dataset:<name>`, `run:<name>`, `step:<scorer>`; run.json
records the flow-run id and link. A failed or crashed run is marked in its run directory (last_failure.json) and,
with `notify:` set, announced through Apprise.
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from prefect import flow, get_run_logger, task
from pydantic import Field
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import Opaque, io_error_only, make_task_runner, prefect_fan_out, shared_api
from pipeline import progress
from pipeline.config import CurateConfig, StepConfig, merge_run_parameters, read_yaml_mapping
from pipeline.runlock import RunLockedError, describe
from pipeline.sequence import run_curate_sequence

T = TypeVar("T")
FAILURE_FILE = "last_failure.json"
IO_STAGES = {"ingest", "embed_targets", "export"}  # reading sources, writing remote copies: retried on transient I/O errors


@task(cache_policy=NO_CACHE)
def stage_call(fn: Callable[..., Any], call: Opaque) -> Any:
    """One fan-in stage of the sequence, run in the flow's process (its fan-outs go to the flow's task runner)."""
    args, kwargs = call.value
    return fn(*args, **kwargs)


class PrefectExecutor:
    """pipeline.sequence's Executor inside a Prefect flow run: each stage a task named after it (called directly,
    so it runs in the flow's process), each fan-out a task per unit on the flow's task runner."""

    def __init__(self, cfg: CurateConfig) -> None:
        from prefect.context import FlowRunContext

        self.shares_memory = cfg.runner.kind == "local"
        progress.set_sink_factory(prefect_progress_sink)
        context = FlowRunContext.get()
        self.flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
        self.flow_run_url = flow_run_url(self.flow_run_id) if self.flow_run_id else None

    def stage(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        options: dict[str, Any] = {"name": name, "task_run_name": name}
        if name in IO_STAGES:
            options.update(retries=2, retry_delay_seconds=2, retry_condition_fn=io_error_only)
        return stage_call.with_options(**options)(fn, Opaque((args, kwargs)))

    def fan_out(self, fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
        return prefect_fan_out(fn, calls)

    def log(self, message: str) -> None:
        get_run_logger().info(message)

    def previous_run_died(self, holder: dict[str, Any]) -> None:
        get_run_logger().warning("an earlier run of this run directory did not finish: %s; taking over%s", describe(holder),
                                 mark_stale_run(holder))

    def published(self, cfg: CurateConfig, info: dict[str, Any], report_path: Any) -> None:
        """A markdown artifact for the UI: counts by reason, links to the report and the manifest."""
        from prefect.artifacts import create_markdown_artifact

        (cfg.run_dir / FAILURE_FILE).unlink(missing_ok=True)  # the run directory's last run succeeded
        counts = info["counts"]
        rows = "\n".join(f"| {reason} | {n} |" for reason, n in counts["by_reason"].items())
        delta = "\n".join(f"| {change} | {n} |" for change, n in (info.get("delta") or {}).items())
        delta = (f"Version {info.get('version')} against version {info.get('previous_version') or '(none)'}:\n\n"
                 f"| change | rows |\n|---|---|\n{delta}\n\n") if delta else ""
        link = f"Report: [{report_path}](file://{Path(report_path).resolve()})  \n" if report_path else ""
        evaluation = ""
        if info.get("evaluation"):  # the selection against random (the `evaluate:` block)
            from pipeline.evaluate import format_evaluation

            evaluation = f"## Selection vs random\n\n```\n{format_evaluation(info['evaluation'])}\n```\n\n"
        create_markdown_artifact(
            key=f"winnow-{cfg.name}".lower().replace("_", "-").replace(".", "-"),
            markdown=(
                f"# winnow run `{cfg.name}`\n\n{counts['kept']} of {counts['samples']} samples kept.\n\n"
                f"| reason | rows |\n|---|---|\n{rows}\n\n{delta}"
                f"{evaluation}"
                f"{link}Manifest: `{cfg.run_dir.resolve() / 'manifest.parquet'}`\n"
            ),
            description=f"winnow curate summary for {cfg.name}",
        )


def prefect_progress_sink(stage_name: str) -> progress.Sink:
    """A stage's progress inside a flow run: each progress line into the flow run's log, and a progress artifact (the
    UI's bar for the stage, its description the latest line). Raises outside a run context (progress then logs plainly)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    try:
        artifact = create_progress_artifact(0.0, description=f"winnow {stage_name}")
    except Exception as exc:  # noqa: BLE001 - the bar is a nicety: the log lines carry the same
        logger.debug("no progress artifact for %s: %s", stage_name, exc)
        artifact = None

    def emit(text: str, fraction: float) -> None:
        logger.info(text, extra={"winnow_progress": True})
        if artifact is not None:
            try:
                update_progress_artifact(artifact, 100.0 * fraction, description=text)
            except Exception:  # noqa: BLE001, S110 - as above; a failed update must never fail the stage
                pass

    return emit


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI when one is configured, else its API resource (None without an API)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui, api = PREFECT_UI_URL.value(), PREFECT_API_URL.value()
    if ui:
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return f"{api.rstrip('/')}/flow_runs/{flow_run_id}" if api else None


def mark_stale_run(holder: dict[str, Any]) -> str:
    """Sets a dead holder's flow run, still RUNNING in Prefect, to CRASHED; returns what was done, for the log line."""
    run_id = holder.get("flow_run_id")
    if not run_id:
        return ""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is None or state.is_final():
                return f" (its flow run is {state.type.value if state else 'stateless'})"
            client.set_flow_run_state(run_id, Crashed(message=f"process {holder.get('pid')} on {holder.get('host')} died "
                                                              "holding the run directory (found by a later run)"), force=True)
            return f" (its flow run was still {state.type.value} in Prefect: set to CRASHED)"
    except Exception as exc:  # noqa: BLE001 - another server, or none: the run goes on
        return f" (its flow run could not be checked: {type(exc).__name__})"


def resolve_parameters(
    config_path: str | None,
    config: CurateConfig | dict[str, Any] | None,
    *,
    name: str | None = None,
    keep_fraction: float | None = None,
    steps: list[StepConfig] | None = None,
    overrides: dict[str, Any] | None = None,
) -> CurateConfig:
    """The run's config: exactly one of config_path / config, with the overrides merged and validated."""
    if (config_path is None) == (config is None):
        raise ValueError("give exactly one of config_path (a YAML file) and config (a whole config)")
    if config_path is not None:
        base = read_yaml_mapping(config_path)
    else:
        base = config.model_dump(mode="json") if isinstance(config, CurateConfig) else dict(config)
    return merge_run_parameters(
        base, name=name, keep_fraction=keep_fraction, overrides=overrides,
        steps=[s.model_dump(mode="json") if isinstance(s, StepConfig) else dict(s) for s in steps] if steps is not None else None,
    )


def flow_run_tags(cfg: CurateConfig) -> list[str]:
    """`winnow`, the dataset, the run and every step's scorer: filterable in the UI and by automations."""
    return ["winnow", f"dataset:{dataset_name(cfg)}", f"run:{cfg.name}", *dict.fromkeys(f"step:{s.scorer}" for s in cfg.steps)]


def dataset_name(cfg: CurateConfig) -> str:
    """The source's folder or file name (its root, path or first URL), else its kind."""
    args = cfg.source.model_extra or {}
    for key in ("root", "path", "urls", "url", "embeddings", "table"):
        value = args.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str) and value.strip("/"):
            return Path(value.rstrip("/")).name.split("{")[0] or cfg.source.kind
    return cfg.source.kind


def _flow_run_name() -> str:
    """`<config name>-<UTC time>`; from the parameters alone (the config file is read only for its name)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    name = params.get("name")
    if name is None and isinstance(params.get("config"), dict | CurateConfig):
        config = params["config"]
        name = config.name if isinstance(config, CurateConfig) else config.get("name")
    if name is None and params.get("config_path"):
        try:
            name = read_yaml_mapping(params["config_path"]).get("name")
        except (OSError, ValueError):
            name = None
    return f"{name or 'curate'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _mark_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed: writes <run_dir>/last_failure.json and, with `notify:` configured, sends it."""
    logger = get_run_logger() if _in_run() else None
    try:
        if isinstance(state.result(raise_on_failure=False), RunLockedError):
            return  # the run directory belongs to a live run: nothing of this run to mark there
    except Exception:  # noqa: BLE001 - a result that cannot be read is not a lock refusal
        pass
    try:
        params = flow_run.parameters or {}
        cfg = resolve_parameters(params.get("config_path"), params.get("config"), name=params.get("name"),
                                 keep_fraction=params.get("keep_fraction"), steps=params.get("steps"), overrides=params.get("overrides"))
    except Exception:  # noqa: BLE001 - an invalid config has no run directory to mark
        return
    record = {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "state": state.type.value,
              "message": state.message, "host": socket.gethostname(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "url": flow_run_url(str(flow_run.id))}
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / FAILURE_FILE).write_text(json.dumps(record, indent=2))
    if cfg.notify:
        sent = notify(cfg.notify, title=f"winnow run {cfg.name}: {state.type.value}",
                      body=f"flow run {flow_run.name} ({flow_run.id}) {state.type.value}: {state.message}")
        if logger is not None and not sent:
            logger.warning("notify: Apprise could not deliver to %s", cfg.notify.split("://")[0] + "://...")


def _in_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def notify(url: str, *, title: str, body: str) -> bool:
    """Sends one message through Apprise (installed with Prefect) to `url`; True when delivered."""
    import apprise

    sender = apprise.Apprise()
    if not sender.add(url):
        return False
    return bool(sender.notify(title=title, body=body))


@flow(name="curate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1), flow_run_name=_flow_run_name,
      on_failure=[_mark_failure], on_crashed=[_mark_failure])
def curate(
    config_path: str | None = None,
    config: CurateConfig | None = None,
    name: str | None = None,
    keep_fraction: Annotated[float, Field(gt=0, le=1)] | None = None,
    steps: list[StepConfig] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embeds a dataset, clusters it, runs the configured scorers and writes a Parquet manifest.

    Args:
        config_path: the YAML config file (read when the run starts; relative paths in it are resolved from the
            worker's working directory).
        config: a whole config instead of config_path.
        name: run name (the run directory under output_root).
        keep_fraction: sets the keep_fraction of every step that has one.
        steps: replaces the config's steps (each `{scorer: NAME, knob: value, ...}`).
        overrides: any other value by dotted key, like the CLI's --set (e.g. {"index.k": 50}).

    The merged config is validated before any work. Fan-out work (embedding shards, assignment shards, SemDeDup
    cluster batches, manifest parts) runs as tasks on the flow's task runner (run_curate picks it from the config).
    Returns the run summary (also written as run.json beside the manifest).
    """
    cfg = resolve_parameters(config_path, config, name=name, keep_fraction=keep_fraction, steps=steps, overrides=overrides)
    _label_flow_run(cfg)
    return run_curate_sequence(cfg, PrefectExecutor(cfg))


def _label_flow_run(cfg: CurateConfig) -> None:
    """Adds the config's tags to this flow run (they depend on the config, known only now)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    tags = sorted({*(context.flow_run.tags or []), *flow_run_tags(cfg)})
    with get_client(sync_client=True) as client:
        client.update_flow_run(context.flow_run.id, tags=tags)


def run_curate(config: CurateConfig | dict[str, Any]) -> dict[str, Any]:
    """Runs the curate flow on the task runner its config names (`runner:`): the entry point for the CLI."""
    cfg = config if isinstance(config, CurateConfig) else CurateConfig.model_validate(config)
    with shared_api(cfg.runner):
        return curate.with_options(task_runner=make_task_runner(cfg.runner))(config=cfg)
