"""One run at a time per workspace: an advisory lock on <workspace>/.genloop/workspace.lock.

The lock is an `flock` held on an open file, so the kernel releases it when its process
dies, even by SIGKILL: a lock file left behind by a dead run is detected as stale and taken
over (with a warning naming the dead run). The file records who holds it (pid, host,
command, since when) for the "another run holds the workspace" message.

The lock is re-entrant within a process (the loop flow holds it while its stage tasks run in
threads) and is inherited by the child processes a run starts (torchrun workers), through
the GENLOOP_WORKSPACE_LOCK variable naming the holder's token.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from genloop.core.errors import GenloopError
from genloop.core.workspace import Workspace

log = logging.getLogger(__name__)

ENV_VAR = "GENLOOP_WORKSPACE_LOCK"
WAIT_VAR = "GENLOOP_LOCK_WAIT_SECONDS"

_held: dict[Path, tuple[int, int, str]] = {}  # lock path -> (fd, depth, token)
_guard = threading.Lock()


class WorkspaceBusy(GenloopError):
    """Another run holds the workspace lock."""


def lock_path(ws: Workspace) -> Path:
    return ws.root / ".genloop" / "workspace.lock"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    return (f"since {holder.get('since', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}: "
            f"{holder.get('command', '?')})")


def _inherited(path: Path) -> bool:
    """True when a parent process holds this lock and passed its token down to us."""
    value = os.environ.get(ENV_VAR, "")
    where, _, token = value.rpartition("|")
    return bool(token) and where == str(path) and _read_holder(path).get("token") == token


def holder(ws: Workspace) -> dict[str, Any] | None:
    """Who holds the workspace now (None when nobody does)."""
    path = lock_path(ws)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(path: Path, what: str, wait: float) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                busy = _read_holder(path)
                os.close(fd)
                raise WorkspaceBusy(
                    f"another run holds the workspace {path.parent.parent} {_describe(busy)}; "
                    f"wait for it to finish (or stop it), or set {WAIT_VAR} to wait. Lock file: {path}"
                ) from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    previous = _read_holder(path)
    if previous.get("pid"):
        log.warning("workspace lock %s was left by a run that is gone (%s); taking it over",
                    path, _describe(previous))
    token = secrets.token_hex(16)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": token}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    return fd, token


def _release(path: Path, fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # an empty file: released cleanly, nothing stale to report
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def workspace_lock(ws: Workspace, what: str | None = None, wait: float | None = None) -> Iterator[None]:
    """Hold the workspace for one run; raise WorkspaceBusy naming the holder when another has it.

    `wait` seconds (default: $GENLOOP_LOCK_WAIT_SECONDS or 0) are spent waiting for a holder to finish.
    """
    path = lock_path(ws)
    if _inherited(path):
        yield
        return
    what = what or " ".join(["genloop", *sys.argv[1:]])[:200]
    wait = float(os.environ.get(WAIT_VAR, "0")) if wait is None else wait
    with _guard:
        entry = _held.get(path)
        if entry is None:
            fd, token = _acquire(path, what, wait)
            _held[path] = (fd, 1, token)
        else:
            _held[path] = (entry[0], entry[1] + 1, entry[2])
        token = _held[path][2]
    saved = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = f"{path}|{token}"
    try:
        yield
    finally:
        with _guard:
            fd, depth, token = _held[path]
            if depth == 1:
                del _held[path]
                _release(path, fd)
                if saved is None:
                    os.environ.pop(ENV_VAR, None)
                else:
                    os.environ[ENV_VAR] = saved
            else:
                _held[path] = (fd, depth - 1, token)
