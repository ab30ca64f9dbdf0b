"""The one progress interface of the library: rich bars on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("genloop.core.progress")


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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

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
