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


def fail(message: str) -> None:
    """Print `error: message` on stderr and exit with status 2 (a user-fixable problem)."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
