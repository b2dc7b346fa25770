"""Modules imported on first use.

Config validation imports every step module (scorers.step.registry) to learn the steps' knobs; importing torch or
faiss there costs seconds before a config error can be reported. Step modules bind heavy modules with
``torch = lazy_module("torch")``: the real import happens when a scorer first touches ``torch.<anything>``.
A class cannot subclass a lazy module's attribute at import time: torch.nn.Module subclasses live in scorers/nets.py.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports the module on the first attribute access."""
    return _LazyModule(name)
