"""Logging set-up for entry points (the CLI); the library itself only logs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, quote_plus

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "genloop",
    # a stage run from the CLI that maps chunks on Dask (a Prefect flow) logs to the terminal only
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "GIT_PYTHON_REFRESH": "quiet",
    # a first start migrates a fresh Prefect database: slower than the 20 s default on 2 cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


# --- secrets never reach logs, MLflow or Prefect -----------------------------------------

# credential variables by name; any variable whose name looks like one is masked too
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "GENLOOP_REVIEW_TOKEN")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH_STRING",
                          re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter values ("testing") would mask ordinary words
# scheme://user:password@host -> scheme://***@host (URIs in params, sinks, tracking and DVC URLs)
# (a password may hold '/' unencoded: user:pa/ss@host)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@:]*:[^\s?#@]*|[^\s/?#@]+)@")


def secret_values() -> dict[str, str]:
    """{value: variable} of the credentials in the environment, longest first."""
    found = {}
    # names first, then each value: another thread may unset a variable meanwhile (MLflow's telemetry
    # drops _MLFLOW_TELEMETRY_SESSION_ID), and os.environ.items() then raises KeyError mid-way
    for name in list(os.environ):
        value = os.environ.get(name)
        if value is not None and (name in SECRET_VARS or _SECRET_NAME.search(name)) and len(value) >= MIN_SECRET_LENGTH:
            found[value] = name
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def redact(text: str) -> str:
    """`text` with URL credentials (user:password@) and the values of credential variables
    (also URL-encoded) replaced by placeholders."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    for value, name in secret_values().items():
        for form in {value, quote(value, safe=""), quote_plus(value)}:
            if form in text:
                text = text.replace(form, f"<{name}>")
    return text


def redact_obj(obj: Any) -> Any:
    """`redact` applied to every string in a JSON-like value (dict keys too)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


_base_factory: Callable[..., logging.LogRecord] | None = None


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _base_factory is not None
    record = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: leave it to the handler to report
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        if redact(text) != text:  # the handler prints this text instead of re-formatting
            record.exc_text = redact(text)
    return record


def install_redaction() -> None:
    """Mask credentials in every log record of this process, whatever handler sends it on
    (console, files, Prefect's API handler): a log record factory, installed once."""
    global _base_factory
    current = logging.getLogRecordFactory()
    if current is _redacting_factory:
        return
    _base_factory = current
    logging.setLogRecordFactory(_redacting_factory)


# Libraries whose DEBUG lines are for their own developers: INFO with --verbose, else WARNING.
# (Prefect sets its loggers' levels itself; ConsoleFilter decides which of its lines show.)
THIRD_PARTY_LOGGERS = ("mlflow", "alembic", "great_expectations", "urllib3", "botocore", "matplotlib", "httpx",
                       "filelock", "PIL", "numexpr", "optuna", "dvc", "fsspec", "asyncio")
# Prefect's run loggers: their records carry the flow/task run's name; their state lines stay visible
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_TEMPORARY_SERVER = "Starting temporary server"
_FINISHED = re.compile(r"^Finished in state (?P<state>\w+)\((?P<detail>.*)\)$", re.DOTALL)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


NOT_ON_CONSOLE = {"on_console": False}  # `extra` of a line for Prefect's logs and --verbose only


class ConsoleFilter(logging.Filter):
    """What reaches the console. At default verbosity: genloop's own lines, the lines of
    Prefect's flow and task runs (their states), and every WARNING or worse; other libraries'
    INFO lines (MLflow creating its tables, Optuna creating a study, Prefect's server) only with
    --verbose, as are genloop's lines logged with `extra=NOT_ON_CONSOLE` (one per Dask chunk: the
    console has a progress bar). Prefect's API handler, which feeds its UI, still gets everything."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        if not getattr(record, "on_console", True):
            return False
        if _within(record.name, ("genloop", *RUN_LOGGERS)):
            return True
        # the line that explains the wait while Prefect's temporary API server starts
        return record.name == "prefect" and str(record.msg).startswith(_TEMPORARY_SERVER)


class ConsoleFormatter(logging.Formatter):
    """Names the Prefect flow or task run a run logger's line is about: Prefect's own console
    format does, genloop's plain one would not ("Finished in state Completed()" of what?)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "prefect" and text.startswith(_TEMPORARY_SERVER):
            return text.splitlines()[0]  # not the link to Prefect's docs that follows
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if not run or not _within(record.name, RUN_LOGGERS):
            return text
        finished = _FINISHED.match(text)
        if finished:
            state, detail = finished["state"], finished["detail"]
            # Failed('...') says why; Completed() and Cached(type=COMPLETED) say nothing more
            return f"{run} finished: {state}" + (f" {detail}" if detail and not detail.startswith("type=") else "")
        return text if f"'{run}'" in text else f"{run}: {text}"


def setup(verbose: bool = False) -> None:
    """Rich log lines on stderr: genloop's own and Prefect's run states, other libraries' INFO
    chatter only with `verbose`; offline-friendly defaults."""
    from rich.console import Console
    from rich.logging import RichHandler

    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # MLflow sets its logger's level from this when it is imported (after this, mostly)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    install_redaction()
    # the time of day only: the date would take 9 of the console's columns on every line
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(ConsoleFilter(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # No warning filter: the warnings `genloop loop` printed (MLflow's, on the pyfunc's type
    # hints) are fixed where they came from, and with the blanket filters gone no other shows.
    # A filter for a third-party warning nobody can act on names its message and module.


class _UserErrorWithoutTraceback(logging.Filter):
    """Drops the traceback from a log record about a GenloopError: its message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        from genloop.core.errors import GenloopError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GenloopError):
            record.exc_info = None
            record.exc_text = None
        return True


PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect.flow_engine",
                       "prefect.task_engine")


def hide_user_error_tracebacks() -> None:
    """Prefect logs every task/flow failure with its traceback; for genloop's own errors (bad
    input, unreachable endpoint: the message names what to fix) the message alone is clearer.

    The flows call this at import, in every flow-run process: it also masks credentials in
    every log record there (install_redaction), before Prefect's handlers send them on."""
    install_redaction()
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorWithoutTraceback())
