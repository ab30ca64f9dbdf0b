"""genloop's command line: one command per stage, `loop` for all of them as a Prefect flow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from genloop.stages import HELP, ORDER

app = typer.Typer(
    help="genloop: the generative-AI data flywheel. Stages, in loop order: "
    + " -> ".join(ORDER)
    + ". `genloop loop` runs them all as a Prefect flow; `dvc repro` runs clean..optimize from dvc.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="override a param: dotted.key=value (repeatable), like `dvc exp run -S`."),
]
WorkspaceOpt = Annotated[
    Path, typer.Option("--workspace", "-w", help="workspace folder holding data/, models/, reports/.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging.")]


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _run_stage(name: str, params: Path, sets: list[str] | None, workspace: Path, verbose: bool) -> dict[str, Any]:
    from genloop import logs
    from genloop.config import load_params
    from genloop.errors import GenloopError
    from genloop.stages import stage_fn
    from genloop.workspace import Workspace

    logs.setup(verbose)
    try:
        cfg = load_params(params, sets or [])
        return stage_fn(name)(cfg, Workspace.at(workspace))
    except GenloopError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _make_stage_command(name: str) -> None:
    def command(
        params: ParamsOpt = Path("params.yaml"),
        set_: SetOpt = None,
        workspace: WorkspaceOpt = Path("."),
        verbose: VerboseOpt = False,
    ) -> None:
        summary = _run_stage(name, params, set_, workspace, verbose)
        typer.echo(json.dumps(summary, indent=2, default=str))

    command.__doc__ = HELP[name]
    app.command(name=name, help=HELP[name])(command)


for _name in ORDER:
    _make_stage_command(_name)


@app.command()
def loop(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    collect: Annotated[bool, typer.Option(help="run collect first (then `dvc add`).")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole loop as a Prefect flow (ephemeral Prefect API when PREFECT_API_URL is unset),
    under one MLflow parent run, and print where the results are."""
    from genloop import logs
    from genloop.config import load_params
    from genloop.errors import GenloopError

    logs.setup(verbose)
    try:
        load_params(params, set_ or [])  # fail on bad params before Prefect starts
        from genloop.flows import loop_flow

        result = loop_flow(params_file=str(params), overrides=set_ or [], workspace=str(workspace),
                           collect=collect)
    except GenloopError as exc:
        _fail(str(exc))
        return
    typer.echo(result["where"])


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved, validated params (a dry run: nothing else happens)."""
    import yaml

    from genloop.config import load_params
    from genloop.errors import GenloopError

    try:
        cfg = load_params(params, set_ or [])
    except GenloopError as exc:
        _fail(str(exc))
        return
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))


def main() -> None:
    app(prog_name="genloop")


if __name__ == "__main__":
    sys.exit(main())
