"""Local services for scheduled runs: an MLflow tracking server, a Prefect server, and a worker
on a process work pool, all on 127.0.0.1, started in the background.

`up` records what it started in `<dir>/services.json` (pid and start time of each process) and
writes `<dir>/env.sh` with the URLs to export; `down` stops exactly those processes and their
children, and nothing that merely reuses one of their pids. Logs go to `<dir>/logs/`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genloop.core.errors import GenloopError
from genloop.core.storage import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

POOL = "genloop-local"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    """Where the services listen."""

    mlflow: int = 5000
    prefect: int = 4200

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://{HOST}:{self.prefect}"


def _bin(name: str) -> str:
    """An executable of this virtualenv (mlflow, prefect), next to the running Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _port_free(port: int) -> bool:
    """Whether a server can listen on `port`. Like the servers themselves (uvicorn, for MLflow and Prefect), the
    probe sets SO_REUSEADDR: the connections a stopped server leaves in TIME_WAIT for a minute do
    not hold the port (without it, `services up` right after `services down` said it was in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def service_env(ports: Ports) -> dict[str, str]:
    """The variables that point genloop, MLflow and Prefect clients at these services."""
    return {"MLFLOW_TRACKING_URI": ports.mlflow_url, "MLFLOW_REGISTRY_URI": ports.mlflow_url,
            "PREFECT_API_URL": ports.prefect_api}


def _base_env(home: Path) -> dict[str, str]:
    from genloop.core.logs import OFFLINE_DEFAULTS

    env = {**OFFLINE_DEFAULTS, **os.environ}
    env["PREFECT_HOME"] = str(home / "prefect")
    env.setdefault("NO_PROXY", "127.0.0.1,localhost")
    env.pop("PREFECT_API_URL", None)
    return env


def _commands(home: Path, ports: Ports) -> dict[str, tuple[list[str], dict[str, str]]]:
    base = _base_env(home)
    mlflow_cmd = [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(ports.mlflow), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
    ]
    prefect_cmd = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports.prefect)]
    worker_cmd = [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                  "--name", f"genloop-worker-{ports.prefect}"]
    # flow runs are children of the worker and inherit its environment: they track to the
    # MLflow server and read S3/AWS settings from the shell that ran `services up`
    worker_env = {**base, **service_env(ports)}
    return {"mlflow": (mlflow_cmd, base), "prefect": (prefect_cmd, base), "worker": (worker_cmd, worker_env)}


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{name}.log"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    return {"pid": proc.pid, "create_time": _create_time(proc.pid), "cmd": shlex.join(cmd), "log": str(log_file)}


def _get(url: str, timeout: float = 2.0) -> Any:
    import httpx

    return httpx.get(url, timeout=timeout, trust_env=False)


# psutil dates a process as boot time + ticks since boot, and reads boot time afresh from the
# system clock on every call, so the same process can read a second apart after a clock step
# (seen in CI: a healthy MLflow server reported as "exited during start-up"). A PID recycled
# within this window of the recorded start is not a realistic case.
_SAME_PROCESS_S = 2.0


def _alive(entry: dict[str, Any]) -> bool:
    created = _create_time(entry["pid"])
    recorded = entry.get("create_time")
    return created is not None and recorded is not None and abs(created - recorded) < _SAME_PROCESS_S


def _wait(what: str, entry: dict[str, Any], ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(entry):
            tail = Path(entry["log"]).read_text(errors="replace")[-3000:]
            raise GenloopError(f"{what} exited during start-up; last lines of {entry['log']}:\n{tail}")
        try:
            if ready():
                return
        except Exception:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise GenloopError(f"{what} did not become ready within {timeout:.0f} s; see {entry['log']}")
        time.sleep(0.5)


def _worker_online(ports: Ports) -> bool:
    import httpx

    reply = httpx.post(f"{ports.prefect_api}/work_pools/{POOL}/workers/filter", json={}, timeout=2.0,
                       trust_env=False)
    return reply.status_code == 200 and any(w.get("status") == "ONLINE" for w in reply.json())


def state_file(home: Path) -> Path:
    return home / "services.json"


def status(home: Path) -> dict[str, Any]:
    """What `up` recorded in `home`, with each process marked running or not."""
    path = state_file(home)
    if not path.exists():
        return {}
    state = read_json(path)
    for entry in state.get("processes", {}).values():
        entry["running"] = _alive(entry)
    return state


def up(home: Path, workspace: Path, ports: Ports = Ports(), timeout: float = 240) -> dict[str, Any]:
    """Start MLflow server, Prefect server and a process-pool worker; wait until each is ready.

    Returns the recorded state (URLs, pids, logs). Raises GenloopError naming the port, log
    file or service that is in the way; whatever was started before the failure is stopped.
    """
    current = status(home)
    running = [n for n, e in current.get("processes", {}).items() if e["running"]]
    if running:
        raise GenloopError(
            f"services already running from {home} ({', '.join(running)}): "
            "`genloop services status` shows them, `genloop services down` stops them"
        )
    for what, port, option in (("MLflow", ports.mlflow, "--mlflow-port"), ("Prefect", ports.prefect, "--prefect-port")):
        if not _port_free(port):
            raise GenloopError(f"port {port} on {HOST} (for the {what} server) is in use: stop what holds it "
                               f"or choose another with `genloop services up {option} N`")
    home.mkdir(parents=True, exist_ok=True)
    commands = _commands(home, ports)
    state: dict[str, Any] = {
        "home": str(home), "workspace": str(workspace), "pool": POOL,
        "urls": {"mlflow": ports.mlflow_url, "prefect_ui": ports.prefect_ui, "prefect_api": ports.prefect_api},
        "env": service_env(ports), "processes": {}, "started_at": time.time(),
    }
    t0 = time.monotonic()
    try:
        for name in ("mlflow", "prefect"):
            state["processes"][name] = _start(name, *commands[name], home / "logs")
            write_json_atomic(state_file(home), state)
        _wait("MLflow server", state["processes"]["mlflow"],
              lambda: _get(f"{ports.mlflow_url}/health").status_code == 200, timeout)
        _wait("Prefect server", state["processes"]["prefect"],
              lambda: _get(f"{ports.prefect_api}/health").status_code == 200, timeout)
        state["processes"]["worker"] = _start("worker", *commands["worker"], home / "logs")
        write_json_atomic(state_file(home), state)
        _wait(f"Prefect worker on pool {POOL!r}", state["processes"]["worker"], lambda: _worker_online(ports), timeout)
    except BaseException:
        down(home)
        raise
    state["startup_seconds"] = round(time.monotonic() - t0, 1)
    write_json_atomic(state_file(home), state)
    write_text_atomic(home / "env.sh", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in state["env"].items()))
    log.info("services up in %.1f s: MLflow %s, Prefect %s, worker on pool %s",
             state["startup_seconds"], ports.mlflow_url, ports.prefect_ui, POOL)
    return state


def _stop_tree(entry: dict[str, Any], grace: float) -> bool:
    import psutil

    if not _alive(entry):
        return False
    root = psutil.Process(entry["pid"])
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return True


def down(home: Path, grace: float = 20) -> list[str]:
    """Stop the processes `up` started from `home` (worker first); returns the names stopped."""
    path = state_file(home)
    if not path.exists():
        return []
    state = read_json(path)
    stopped = []
    for name in ("worker", "prefect", "mlflow"):
        entry = state.get("processes", {}).get(name)
        if entry and _stop_tree(entry, grace):
            stopped.append(name)
    path.unlink(missing_ok=True)
    log.info("services down: stopped %s", ", ".join(stopped) or "nothing (none was running)")
    return stopped


def describe(state: dict[str, Any]) -> str:
    """Human-readable lines: URLs, processes, logs and the variables to export."""
    if not state:
        return "no services recorded: `genloop services up` starts them"
    lines = [
        f"MLflow tracking server: {state['urls']['mlflow']}",
        f"Prefect UI:             {state['urls']['prefect_ui']}",
        f"Prefect API:            {state['urls']['prefect_api']}",
        f"work pool:              {state['pool']} (process worker)",
    ]
    for name, entry in state.get("processes", {}).items():
        running = "running" if entry.get("running", True) else "NOT running"
        lines.append(f"  {name:8s} pid {entry['pid']:<7d} {running}  log {entry['log']}")
    home = Path(state["home"])
    lines += [
        "",
        f"point your shell at them:  source {home / 'env.sh'}",
        *(f"  export {k}={v}" for k, v in state["env"].items()),
        "then:  prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml",
        "       prefect deployment run 'genloop-loop/nightly' --watch",
    ]
    return "\n".join(lines)


def as_json(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=2, sort_keys=True)
