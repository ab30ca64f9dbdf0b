"""The package's shape holds: layers import only downwards, no import cycle, small functions."""

from __future__ import annotations

import ast
from pathlib import Path

from genloop.orchestrate import code_deps

PACKAGE = code_deps.PACKAGE_ROOT

# each layer may import itself and the layers after it in this list, never one before it
LAYERS = ("cli", "orchestrate", "stages", "feedback", "eval", "mlops", "models", "core")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in code_deps._imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path[path.index(dep):], dep])
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_import_only_downwards():
    wrong = []
    for module, deps in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and LAYERS.index(theirs) < LAYERS.index(mine):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports against the layering (see docs/architecture.md):\n" + "\n".join(sorted(wrong))


def test_no_function_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(sorted(long))
