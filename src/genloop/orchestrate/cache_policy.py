"""Skip what did not change: the cache key of a stage and the check that its outputs are intact.

A stage's key hashes the content of its input files (`stages.table.STAGES`), the params it reads and
the genloop files the stage runs (`code_deps`), so a second loop over unchanged data and params hits Prefect's task
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
import logging
from pathlib import Path
from typing import Any

from genloop.core.config import Params
from genloop.core.storage import read_json, write_json_atomic
from genloop.core.workspace import Workspace
from genloop.orchestrate import code_deps
from genloop.stages.table import BY_NAME

log = logging.getLogger(__name__)


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
def source_hash(stage: str) -> str:
    """sha256 of the genloop files the stage runs (dvc.yaml lists the same files as its deps)."""
    h = hashlib.sha256()
    for f in code_deps.closure(BY_NAME[stage].module):
        h.update(f.relative_to(code_deps.PACKAGE_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _param(dumped: dict[str, Any], dotted: str) -> Any:
    value: Any = dumped
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_inputs(stage: str, cfg: Params, ws: Workspace) -> dict[str, Any]:
    """Everything a stage's result depends on: input fingerprints, params, its code."""
    io = BY_NAME[stage]
    dumped = cfg.model_dump(mode="json", by_alias=True)
    return {
        "stage": stage,
        "inputs": {rel: fingerprint(ws.root / rel) for rel in io.inputs},
        "params": {name: _param(dumped, name) for name in io.params},
        "source": source_hash(stage),
    }


def stage_key(stage: str, cfg: Params, ws: Workspace) -> str:
    """The cache key of a stage in this workspace with these params."""
    payload = json.dumps(stage_inputs(stage, cfg, ws), sort_keys=True, default=str)
    return f"genloop-{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


def _stamp_path(stage: str, ws: Workspace) -> Path:
    return ws.cache / "stamps" / f"{stage}.json"


def _outputs(stage: str, ws: Workspace) -> dict[str, str]:
    return {rel: fingerprint(ws.root / rel) for rel in BY_NAME[stage].outputs}


def write_stamp(stage: str, key: str, ws: Workspace) -> None:
    """Record that `stage` ran under `key` and produced the output files now on disk."""
    write_json_atomic(_stamp_path(stage, ws), {"key": key, "outputs": _outputs(stage, ws)})


# Prefect reads a cached stage result back with the serializer named in the stored cache record
# itself: a record naming pickle, another JSON library or another object hook (e.g.
# subprocess.run) would run code on a cache hit. genloop writes only plain JSON records, and
# uses a cache entry only if its record is exactly that.
JSON_DECODER = "prefect.serializers.prefect_json_object_decoder"
# types Prefect's JSON encoder tags with "__class__" that may be rebuilt from a cached result
SAFE_RESULT_CLASSES = frozenset({"pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath", "datetime.datetime",
                                 "datetime.date", "datetime.timedelta", "uuid.UUID", "decimal.Decimal"})


def _tagged_types(value: Any) -> set[str]:
    """The "__class__"/"__exc_type__" tags anywhere in a JSON value (Prefect's decoder imports them)."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for tag in ("__class__", "__exc_type__"):
                if tag in item:
                    found.add(str(item[tag]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _record_problem(record_path: Path, results: Path, key: str) -> str | None:
    """Why Prefect must not read this cache record back (None when it is a plain JSON one)."""
    try:
        record = json.loads(record_path.read_bytes())
    except ValueError:
        return "it is not JSON"
    serializer = record.get("serializer") if isinstance(record, dict) else None
    kind = serializer.get("type") if isinstance(serializer, dict) else serializer
    if kind != "json" or not isinstance(serializer, dict):
        return f"it names serializer {kind!r}, not json"
    if (serializer.get("jsonlib", "json") != "json" or serializer.get("object_decoder", JSON_DECODER)
            not in (JSON_DECODER, None) or serializer.get("loads_kwargs")):
        return "it changes how its JSON is decoded (jsonlib, object_decoder or loads_kwargs)"
    stored = record.get("storage_key")
    if not isinstance(stored, str) or Path(stored).resolve() != (results / key).resolve():
        return f"its result is stored at {stored!r}, not at {results / key}"
    result_path = results / key
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_bytes())
        except ValueError:
            return "its result is not JSON"
        if unsafe := sorted(_tagged_types(result) - SAFE_RESULT_CLASSES):
            return f"its result would rebuild {', '.join(unsafe)}"
    return None


def cache_record_safe(key: str, ws: Workspace) -> bool:
    """False when Prefect's cache record of `key` would be read back other than as plain JSON
    (a tampered or foreign record): the flow then runs the stage again instead of using it."""
    store = results_dir(ws)
    record_path = store / "records" / key
    if not record_path.is_file():
        return True  # nothing cached under this key: Prefect has nothing to read
    problem = _record_problem(record_path, store / "results", key)
    if problem:
        log.warning("not using the cached result of %s: %s; the stage runs again (genloop reads cached results "
                    "only as plain JSON, never unpickles them)", record_path, problem)
        return False
    return True


def outputs_intact(stage: str, key: str, ws: Workspace) -> bool:
    """True when the stage last ran under `key`, its output files are unchanged since, and its
    cached result would be read back as JSON (never unpickled)."""
    path = _stamp_path(stage, ws)
    if not path.exists():
        return False
    if not cache_record_safe(key, ws):
        return False
    try:
        stamp = read_json(path)
    except ValueError:
        return False
    return stamp.get("key") == key and stamp.get("outputs") == _outputs(stage, ws)


def results_dir(ws: Workspace) -> Path:
    """Where Prefect persists cached stage results and cache records for this workspace."""
    return ws.cache / "prefect"
