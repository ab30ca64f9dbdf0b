"""The genloop source files a stage runs: the import closure of its module.

dvc.yaml lists these files as each stage's code deps and the Prefect task cache hashes the same
files, so `dvc repro` and the flow rerun a stage on exactly the same code changes: editing the
review page reruns nothing, editing the VAE reruns train and what follows it.

Imports are read from the source (every `import` statement, including the ones inside
functions), not from `sys.modules`, so the answer does not depend on what happened to be
imported already. Hand-written because modulefinder also follows third-party packages and
misses nothing we need here: genloop never imports its own modules by computed name.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/genloop
SRC_ROOT = PACKAGE_ROOT.parent


def module_file(module: str) -> Path | None:
    """The file of a genloop module or package, or None when it is not one of genloop's."""
    parts = module.split(".")
    if parts[0] != "genloop":
        return None
    base = SRC_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(path: Path) -> set[str]:
    """Modules named by the import statements of one file (genloop's only)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from genloop.stages import clean` imports the submodule genloop.stages.clean
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "genloop" and module_file(m) is not None}


@functools.cache
def closure(module: str) -> tuple[Path, ...]:
    """Every genloop file that importing `module` and running its code may import, sorted."""
    todo = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        todo.extend(_parents(name))
        todo.extend(_imports(path))
    files = {module_file(m) for m in seen}
    return tuple(sorted(f for f in files if f is not None))


def relative_deps(module: str) -> list[str]:
    """The closure as repository-relative paths, the way dvc.yaml lists them."""
    repo = SRC_ROOT.parent
    return [f.relative_to(repo).as_posix() for f in closure(module)]


_CODE_COMMENT = "      # code: the genloop files this stage imports (python -m genloop.orchestrate.code_deps)"


def rewrite_dvc_yaml(text: str) -> str:
    """dvc.yaml with each stage's `src/` deps replaced by its import closure (comments kept)."""
    out: list[str] = []
    stage = ""
    in_deps = False
    for line in text.split("\n"):
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if line.startswith("    deps:"):
            in_deps = True
            out.append(line)
            out.append(_CODE_COMMENT)
            out.extend(f"      - {dep}" for dep in relative_deps(f"genloop.stages.{stage}"))
            continue
        if in_deps and not line.startswith("      "):
            in_deps = False
        if in_deps and (line.startswith("      - src/") or line == _CODE_COMMENT):
            continue
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":  # python -m genloop.orchestrate.code_deps: refresh dvc.yaml's code deps
    dvc_yaml = SRC_ROOT.parent / "dvc.yaml"
    dvc_yaml.write_text(rewrite_dvc_yaml(dvc_yaml.read_text()))
