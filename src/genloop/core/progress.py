"""The one progress interface of the library: rich bars on a terminal, log lines elsewhere,
and inside a Prefect flow run also a progress artifact that the Prefect UI shows live."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("genloop.core.progress")


class PrefectProgress:
    """A Prefect progress artifact (key `<description>-progress`) that follows a Progress, updated
    at most every `every` seconds. Only inside a Prefect flow or task run: from the plain CLI or
    `dvc repro` it does nothing (and does not import Prefect). A Prefect API that fails to answer
    costs a debug line, never the work it reports on."""

    def __init__(self, description: str, total: int | None, every: float = 5.0) -> None:
        self.id: Any = None
        self.every = every
        self._last = 0.0
        if not total or not in_prefect_run():
            return
        self.key = re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")[:40] + "-progress"
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, key=self.key, description=f"{description}: starting")
        except Exception as exc:  # the work goes on without its artifact
            log.debug("no progress artifact for %s: %s", description, exc)
        self._last = time.monotonic()

    def update(self, percent: float, text: str, final: bool = False) -> None:
        if self.id is None or (not final and time.monotonic() - self._last < self.every):
            return
        self._last = time.monotonic()
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, min(100.0, max(0.0, percent)), description=text)
        except Exception as exc:
            log.debug("progress artifact %s not updated: %s", self.key, exc)
            self.id = None


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (Prefect imported, a run context)."""
    if "prefect" not in sys.modules:  # the CLI's stage commands and dvc repro never import it
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class Progress:
    """A progress reporter for `total` units of work with live key/value stats."""

    def __init__(self, description: str, total: int | None, unit: str = "it") -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.stats: dict[str, str] = {}
        self._start = time.perf_counter()
        self._last_log = self._start
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, stats="")
        self._artifact = PrefectProgress(description, total)

    def _status(self) -> str:
        of = f"/{self.total}" if self.total else ""
        return " ".join(x for x in (f"{self.description}: {self.done}{of} {self.unit}",
                                    " ".join(f"{k}={v}" for k, v in self.stats.items())) if x)

    def advance(self, n: int = 1, **stats: float | str) -> None:
        self.done += n
        for k, v in stats.items():
            self.stats[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        text = " ".join(f"{k}={v}" for k, v in self.stats.items())
        if self._bar is not None:
            self._bar.update(self._task, advance=n, stats=text)
        else:
            now = time.perf_counter()
            if now - self._last_log >= 10 or (self.total and self.done >= self.total):
                self._last_log = now
                of = f"/{self.total}" if self.total else ""
                log.info("%s: %d%s %s %s", self.description, self.done, of, self.unit, text)
        if self._artifact.id is not None and self.total:
            self._artifact.update(100.0 * self.done / self.total, self._status())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._artifact.id is not None and self.total:
            self._artifact.update(100.0 * self.done / self.total, self._status(), final=True)
            self._artifact.id = None  # closed: the artifact keeps its last value

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, reporting progress."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total) as p:
        for item in items:
            yield item
            p.advance()
