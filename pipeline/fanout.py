"""Fan-out: how stages hand independent units of work (shards, cluster batches, manifest parts) to a runner.

A fan-out is a function `fan_out(fn, calls)` that runs `fn(**call)` for every call and returns the results in order.
The curate flow passes one that submits Prefect tasks to its task runner (flows/runners.py); without one, the calls
run here, one after another.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

FanOut = Callable[[Callable[..., Any], list[dict[str, Any]]], list[Any]]


def serial_fan_out(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """Every call in this process, in order."""
    return [fn(**call) for call in calls]
