"""One run at a time per workspace: a clear refusal naming the holder, stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from genloop.core.lock import WorkspaceBusy, holder, lock_path, workspace_lock
from genloop.core.workspace import Workspace
from tests.helpers import BIN, cli_env

HOLD = """
import sys, time
from genloop.core.lock import workspace_lock
from genloop.core.workspace import Workspace
with workspace_lock(Workspace.at(sys.argv[1]), "test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def start_holder(ws: Path, seconds: float = 120) -> subprocess.Popen:
    """A separate process holding the workspace lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=cli_env(ws))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_leaves_a_stale_lock_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = Workspace.at(tmp_path)
    proc = start_holder(tmp_path)
    try:
        info = holder(ws)
        assert info is not None and info["pid"] == proc.pid and info["command"] == "test holder"
        with pytest.raises(WorkspaceBusy) as err:
            with workspace_lock(ws, "second run"):
                pytest.fail("the second run got the lock")
        message = str(err.value)
        assert "another run holds the workspace" in message
        assert f"pid {proc.pid}" in message and f"since {info['since']}" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # SIGKILL: no clean-up ran, the file still names the dead holder, but the kernel dropped the lock
    assert json.loads(lock_path(ws).read_text())["pid"] == proc.pid
    assert holder(ws) is None
    with caplog.at_level("WARNING", logger="genloop.core.lock"), workspace_lock(ws, "after the crash"):
        assert holder(ws)["pid"] == os.getpid()
    assert any("left by a run that is gone" in r.message and str(proc.pid) in r.message for r in caplog.records)
    assert lock_path(ws).read_text() == ""  # released cleanly: nothing stale for the next run


def test_the_cli_refuses_a_loop_and_a_stage_while_another_run_holds_the_workspace(tmp_path: Path) -> None:
    ws_dir = tmp_path / "ws"
    ws_dir.mkdir()
    proc = start_holder(ws_dir)
    try:
        for cmd in (["loop"], ["clean"]):
            t0 = time.monotonic()
            done = subprocess.run([str(BIN / "genloop"), *cmd, "--params", "none.yaml"], cwd=ws_dir,
                                  env=cli_env(ws_dir), capture_output=True, text=True, timeout=120)
            # params are checked first: a missing file is named; then the lock
            assert done.returncode == 2 and "none.yaml" in done.stderr, done.stderr
            (ws_dir / "params.yaml").write_text("train:\n  epochs: 1\n")
            done = subprocess.run([str(BIN / "genloop"), *cmd], cwd=ws_dir, env=cli_env(ws_dir),
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, done.stderr
            err = " ".join(done.stderr.split())
            assert "another run holds the workspace" in err and f"pid {proc.pid}" in err, err
            assert time.monotonic() - t0 < 60  # refused before any work (no Prefect server started)
        assert not (ws_dir / "reports").exists() and not (ws_dir / "data").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_waiting_for_the_lock_gets_it_when_the_holder_finishes(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    proc = start_holder(tmp_path, seconds=1.5)
    try:
        t0 = time.monotonic()
        with workspace_lock(ws, "patient run", wait=60):
            waited = time.monotonic() - t0
            assert json.loads(lock_path(ws).read_text())["command"] == "patient run"
        assert waited > 0.5  # it really waited for the holder
    finally:
        proc.wait()


def test_the_lock_is_reentrant_in_a_process_and_inherited_by_its_child_processes(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    child = ("import sys; from genloop.core.lock import workspace_lock; from genloop.core.workspace import Workspace\n"
             "with workspace_lock(Workspace.at(sys.argv[1]), 'child'): print('child ran')")
    with workspace_lock(ws, "outer"):
        errors: list[BaseException] = []

        def stage_in_a_thread() -> None:  # a Prefect task thread of the loop flow
            try:
                with workspace_lock(ws, "inner"):
                    pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=stage_in_a_thread)
        t.start()
        t.join()
        assert errors == []
        # a torchrun worker started by the run: inherits the lock through the environment
        done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True,
                              env={**os.environ})
        assert done.returncode == 0 and "child ran" in done.stdout, done.stderr
        # an unrelated process (no token) is refused
        done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True,
                              env=cli_env(tmp_path))
        assert done.returncode != 0 and "another run holds the workspace" in done.stderr
        assert json.loads(lock_path(ws).read_text())["command"] == "outer"
    assert lock_path(ws).read_text() == ""
