"""Logging set-up for entry points (the CLI); the library itself only logs."""

from __future__ import annotations

import logging
import os
import warnings

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


def setup(verbose: bool = False) -> None:
    """Rich log lines on stderr; quiet third-party loggers; offline-friendly defaults."""
    from rich.console import Console
    from rich.logging import RichHandler

    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
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
        from genloop.errors import GenloopError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, GenloopError):
            record.exc_info = None
            record.exc_text = None
        return True


PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect.flow_engine",
                       "prefect.task_engine")


def hide_user_error_tracebacks() -> None:
    """Prefect logs every task/flow failure with its traceback; for genloop's own errors (bad
    input, unreachable endpoint: the message names what to fix) the message alone is clearer."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorWithoutTraceback())
