"""Logging set-up for entry points (the CLI); the library itself only logs."""

from __future__ import annotations

import logging
import os
import re
import warnings
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
    for name, value in os.environ.items():
        if (name in SECRET_VARS or _SECRET_NAME.search(name)) and len(value) >= MIN_SECRET_LENGTH:
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


def setup(verbose: bool = False) -> None:
    """Rich log lines on stderr; quiet third-party loggers; offline-friendly defaults."""
    from rich.console import Console
    from rich.logging import RichHandler

    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    install_redaction()
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("mlflow", "alembic", "great_expectations", "urllib3", "botocore", "matplotlib",
                  "httpx", "prefect", "filelock", "PIL", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


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
