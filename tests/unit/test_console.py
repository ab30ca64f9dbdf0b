"""What a user sees on the console: genloop's lines and Prefect's run states, named after their
task or flow run; other libraries' INFO chatter only with --verbose; no blanket warning filter.
And the progress reporter publishes nothing to Prefect outside a Prefect run."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from genloop.core import logs


def _record(name: str, msg: str, level: int = logging.INFO, **extra: str) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("msg,shown", [
    ("Finished in state Completed()", "train finished: Completed"),
    ("Finished in state Cached(type=COMPLETED)", "train finished: Cached"),
    ("Finished in state Failed('Task run encountered an exception ValueError: bad')",
     "train finished: Failed 'Task run encountered an exception ValueError: bad'"),
    ("Task run failed with exception: ValueError('bad')", "train: Task run failed with exception: ValueError('bad')"),
])
def test_a_task_run_line_names_its_task(msg, shown):
    record = _record("prefect.task_runs", msg, task_run_name="train", flow_run_name="loop-0123abcd-20260101-120000")
    assert logs.ConsoleFormatter().format(record) == shown


def test_a_flow_run_line_names_its_flow_run_once():
    name = "loop-0123abcd-20260101-120000"
    fmt = logs.ConsoleFormatter()
    assert fmt.format(_record("prefect.flow_runs", "Finished in state Completed()", flow_run_name=name)) \
        == f"{name} finished: Completed"
    beginning = f"Beginning flow run '{name}' for flow 'genloop-loop'"
    assert fmt.format(_record("prefect.flow_runs", beginning, flow_run_name=name)) == beginning


def test_other_lines_are_left_as_they_are():
    fmt = logs.ConsoleFormatter()
    assert fmt.format(_record("genloop.stages.train", "train: 11 steps in 1.0s")) == "train: 11 steps in 1.0s"
    # a genloop line logged inside a task run is not a run logger's
    assert fmt.format(_record("genloop.stages.train", "x", task_run_name="train")) == "x"
    start = "Starting temporary server on http://127.0.0.1:8018\nSee https://docs.prefect.io/... for more"
    assert fmt.format(_record("prefect", start)) == "Starting temporary server on http://127.0.0.1:8018"


@pytest.mark.parametrize("name,msg,level,default", [
    ("genloop.stages.train", "train: 11 steps", logging.INFO, True),
    ("prefect.task_runs", "Finished in state Completed()", logging.INFO, True),
    ("prefect.flow_runs", "Beginning flow run 'x' for flow 'genloop-loop'", logging.INFO, True),
    ("prefect", "Starting temporary server on http://127.0.0.1:1", logging.INFO, True),
    ("prefect", "Stopping temporary server on http://127.0.0.1:1", logging.INFO, False),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables...", logging.INFO, False),
    ("optuna.storages._journal", "A new study created in Journal with name: genloop", logging.INFO, False),
    ("great_expectations.data_context", "some set-up", logging.INFO, False),
    # Dask chunks' progress: in the flow run's Prefect logs, on the console only with --verbose
    ("genloop.core.chunk_map", "3 of 14 chunks done on the Dask cluster at tcp://h:8786", logging.INFO, False),
    ("py.warnings", "UserWarning: something to fix", logging.WARNING, True),
    ("mlflow.tracking", "something failed", logging.WARNING, True),
])
def test_third_party_info_lines_show_only_with_verbose(name, msg, level, default):
    record = _record(name, msg, level, **(logs.NOT_ON_CONSOLE if name == "genloop.core.chunk_map" else {}))
    assert logs.ConsoleFilter(verbose=False).filter(record) is default
    assert logs.ConsoleFilter(verbose=True).filter(record) is True


@pytest.fixture
def restore_logging(monkeypatch):
    """logs.setup changes the process's logging and environment: put both back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in logs.THIRD_PARTY_LOGGERS}
    for var in [*logs.OFFLINE_DEFAULTS, "MLFLOW_LOGGING_LEVEL"]:
        monkeypatch.setenv(var, os.environ[var]) if var in os.environ else monkeypatch.delenv(var, raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)


@pytest.mark.parametrize("verbose,mlflow_level", [(False, "WARNING"), (True, "INFO")])
def test_setup_filters_no_whole_warning_category(restore_logging, monkeypatch, verbose, mlflow_level):
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    with warnings.catch_warnings():
        before = list(warnings.filters)
        logs.setup(verbose)
        added = [f for f in warnings.filters if f not in before]
    # a filter with neither a message nor a module would hide every warning of its category
    assert not [f for f in added if f[0] == "ignore" and f[1] is None and f[3] is None], added
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == mlflow_level
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler.formatter, logs.ConsoleFormatter)
    assert any(isinstance(f, logs.ConsoleFilter) and f.verbose is verbose for f in handler.filters)


def test_progress_publishes_nothing_outside_a_prefect_run(monkeypatch):
    import prefect.artifacts

    from genloop.core.progress import Progress, in_prefect_run

    calls = []
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda *a, **k: calls.append(a))
    assert not in_prefect_run()
    with Progress("train", 3, "steps") as bar:
        for _ in range(3):
            bar.advance(loss=1.0)
    assert calls == []
