"""The packages' imports point one way: flows → pipeline → manifests → scorers, and no module imports itself back.

Every import counts, at the top of a module or inside a function: a function-local import must not be a way to hide
an import circle or an upward edge. Read with ast (nothing imported), so the test is fast and sees every file.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A package may import its own modules and those of the packages below it, never one above.
LAYERS = {"scorers": 0, "manifests": 1, "pipeline": 2, "flows": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in LAYERS for p in (ROOT / package).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from pkg import module` names the module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in LAYERS and t in known}
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_upward_import():
    upward = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
              if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert not upward, "imports against the layers (flows → pipeline → manifests → scorers):\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_the_walker_sees_local_and_relative_imports(tmp_path):
    """The walker itself: a function-local import and a `from package import module` both count."""
    graph = _graph()
    assert "pipeline.fill_store" in graph["pipeline.sequence"]  # from pipeline.fill_store import ...
    assert "pipeline.progress" in graph["flows.console"]  # from pipeline import progress
    assert "pipeline.embed" in graph["pipeline.fill_store"]  # a function-local import
