"""Skip what did not change: the cache key of a stage and the check that its outputs are intact.

A stage's key hashes the content of its input files (`stages.IO`), the params it reads and
genloop's own source, so a second loop over unchanged data and params hits Prefect's task
cache, and changing one training param misses only from train on. Prefect stores the
results under `.genloop/cache/prefect/` in the workspace.

A cache hit returns the earlier result without running the stage, which is only right if the
stage's output files are still the ones that run wrote. After each run the flow writes a stamp
(key + output fingerprint); when the files changed since (deleted, or rewritten by
`genloop train` / `dvc repro` with other params), the flow refreshes the cache instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from genloop.config import Params
from genloop.stages import IO
from genloop.storage import read_json, write_json_atomic
from genloop.workspace import Workspace

PACKAGE = Path(__file__).resolve().parent


def fingerprint(path: Path) -> str:
    """sha256 over the content of a file, or of every file (with its relative path) in a folder.

    Hidden files (temporary files of atomic writes, lock files) are left out; a missing path
    has the fingerprint "missing".
    """
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                              p.relative_to(path).parts)
    )
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        h.update(b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def source_hash() -> str:
    """sha256 of genloop's own source: new code invalidates every cached stage."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):
        h.update(f.relative_to(PACKAGE).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _param(dumped: dict[str, Any], dotted: str) -> Any:
    value: Any = dumped
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_inputs(stage: str, cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Everything a stage's result depends on: input fingerprints, params, genloop's source."""
    io = IO[stage]
    dumped = cfg.model_dump(mode="json", by_alias=True)
    return {
        "stage": stage,
        "inputs": {rel: fingerprint(ws.root / rel) for rel in io.inputs},
        "params": {name: _param(dumped, name) for name in io.params},
        "source": source_hash(),
    }


def stage_key(stage: str, cfg: Params, ws: Workspace) -> str:
    """The cache key of a stage in this workspace with these params."""
    payload = json.dumps(stage_inputs(stage, cfg, ws), sort_keys=True, default=str)
    return f"genloop-{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


def _stamp_path(stage: str, ws: Workspace) -> Path:
    return ws.cache / "stamps" / f"{stage}.json"


def _outputs(stage: str, ws: Workspace) -> dict[str, str]:
    return {rel: fingerprint(ws.root / rel) for rel in IO[stage].outputs}


def write_stamp(stage: str, key: str, ws: Workspace) -> None:
    """Record that `stage` ran under `key` and produced the output files now on disk."""
    write_json_atomic(_stamp_path(stage, ws), {"key": key, "outputs": _outputs(stage, ws)})


def outputs_intact(stage: str, key: str, ws: Workspace) -> bool:
    """True when the stage last ran under `key` and its output files are unchanged since."""
    path = _stamp_path(stage, ws)
    if not path.exists():
        return False
    try:
        stamp = read_json(path)
    except ValueError:
        return False
    return stamp.get("key") == key and stamp.get("outputs") == _outputs(stage, ws)


def results_dir(ws: Workspace) -> Path:
    """Where Prefect persists cached stage results and cache records for this workspace."""
    return ws.cache / "prefect"
