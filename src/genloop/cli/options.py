"""Options and the error exit shared by every genloop command module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="override a param: dotted.key=value (repeatable), like `dvc exp run -S`."),
]
WorkspaceOpt = Annotated[
    Path, typer.Option("--workspace", "-w", help="workspace folder holding data/, models/, reports/.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging.")]


EX_USAGE = 2  # a problem the user fixes (params, input files, a missing stage output)
EX_TEMPFAIL = 75  # sysexits.h: a server or endpoint did not answer; a scheduler may retry later


def exit_code(problem: str | BaseException) -> int:
    """75 (EX_TEMPFAIL) when a server was temporarily unreachable, else 2."""
    from genloop.core.errors import Unreachable

    return EX_TEMPFAIL if isinstance(problem, Unreachable) else EX_USAGE


def fail(problem: str | BaseException) -> None:
    """Print `error: <problem>` on stderr and exit: 75 when a server was unreachable, else 2."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code(problem))
