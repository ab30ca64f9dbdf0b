"""The command line's conventions: --version, completion, readable help, exit codes schedulers use."""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

from typer.testing import CliRunner

from genloop.cli.main import app
from genloop.cli.options import EX_TEMPFAIL, EX_USAGE, exit_code
from genloop.core.errors import ConfigError, SinkUnreachable, SourceUnreachable, Unreachable
from tests.conftest import free_port
from tests.helpers import BIN, ROOT, cli_env

runner = CliRunner()


def test_version_prints_the_installed_version():
    done = runner.invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"genloop {version('genloop')}"


def test_completion_can_be_shown_and_installed():
    done = runner.invoke(app, ["--help"])
    assert "--install-completion" in done.output and "--show-completion" in done.output


def test_defaults_in_brackets_are_printed_not_eaten_as_markup():
    done = runner.invoke(app, ["loop", "--help"], terminal_width=200)
    assert done.exit_code == 0
    assert "[default: loop.autotune]" in " ".join(done.output.split())
    services = runner.invoke(app, ["services", "up", "--help"], terminal_width=200)
    assert "[default: WORKSPACE/.genloop/services]" in " ".join(services.output.split())


def test_unreachable_servers_exit_75_and_user_errors_exit_2():
    assert exit_code(Unreachable("x")) == exit_code(SourceUnreachable("x")) == exit_code(SinkUnreachable("x"))
    assert exit_code(SinkUnreachable("x")) == EX_TEMPFAIL == 75
    assert exit_code(ConfigError("x")) == exit_code("a message") == EX_USAGE == 2


def test_a_stopped_tracking_server_exits_with_ex_tempfail(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = cli_env(tmp_path, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    cmd = [str(BIN / "genloop"), "rollback", "--params", str(ROOT / "params.yaml")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr[-3000:]
    assert uri in done.stderr and "Traceback" not in done.stderr


def test_a_bad_param_exits_2_naming_it(tmp_path: Path):
    done = subprocess.run([str(BIN / "genloop"), "params", "--params", str(ROOT / "params.yaml"),
                           "--set", "train.epochs=-1"], cwd=tmp_path,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "train.epochs" in done.stderr
