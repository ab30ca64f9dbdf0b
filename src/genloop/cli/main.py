"""genloop's command line: one command per stage, `loop` for all of them as a Prefect flow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from genloop.cli.feedback import register as register_feedback_commands
from genloop.cli.options import ParamsOpt, SetOpt, VerboseOpt, WorkspaceOpt, fail
from genloop.stages.table import BY_NAME, ORDER

app = typer.Typer(
    help="genloop: the generative-AI data flywheel. Stages, in loop order: "
    + " -> ".join(ORDER)
    + ". `genloop loop` runs them all as a Prefect flow; `dvc repro` runs clean..optimize from dvc.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: their "[default: …]" and brackets print as written
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"genloop {version('genloop')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print genloop's version and exit.")] = False,
) -> None:
    """genloop: the generative-AI data flywheel."""


def _run_stage(name: str, params: Path, sets: list[str] | None, workspace: Path, verbose: bool) -> dict[str, Any]:
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.lock import workspace_lock
    from genloop.core.workspace import Workspace

    logs.setup(verbose)
    try:
        cfg = load_params(params, sets or [])
        ws = Workspace.at(workspace)
        with workspace_lock(ws, f"genloop {name}"):
            return BY_NAME[name].run(cfg, ws)
    except GenloopError as exc:
        fail(exc)
        raise  # unreachable: fail exits


def _make_stage_command(name: str) -> None:
    def command(
        params: ParamsOpt = Path("params.yaml"),
        set_: SetOpt = None,
        workspace: WorkspaceOpt = Path("."),
        verbose: VerboseOpt = False,
    ) -> None:
        summary = _run_stage(name, params, set_, workspace, verbose)
        typer.echo(json.dumps(summary, indent=2, default=str))

    command.__doc__ = BY_NAME[name].help
    app.command(name=name, help=BY_NAME[name].help)(command)


def train_command(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    gpus: Annotated[int | None, typer.Option(
        "--gpus", help="data-parallel processes: >1 relaunches under torchrun with DDP (= --set train.gpus=N)."
    )] = None,
    verbose: VerboseOpt = False,
) -> None:
    sets = [*(set_ or []), *([f"train.gpus={gpus}"] if gpus is not None else [])]
    summary = _run_stage("train", params, sets, workspace, verbose)
    typer.echo(json.dumps(summary, indent=2, default=str))


for _name in ORDER:
    if _name == "train":
        app.command("train", help=BY_NAME["train"].help)(train_command)
    else:
        _make_stage_command(_name)


@app.command("score")
def score_folder(
    folder: Annotated[Path, typer.Argument(help="a folder of images (searched recursively): png, jpg, webp, ...")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report file [default: reports/score.json].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    verbose: VerboseOpt = False,
) -> None:
    """Judge any folder of images (another tool's output, a real set, an older batch) with the
    evaluation's judges against the current data version: FID, KID, C2ST, precision/recall,
    where each sits on the calibration ladder, and memorisation. Trains nothing; needs
    `genloop clean` to have run. Each image is normalised exactly as clean does."""
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.workspace import Workspace
    from genloop.stages import score

    logs.setup(verbose)
    try:
        report = score.run(load_params(params, set_ or []), Workspace.at(workspace), folder, out)
    except GenloopError as exc:
        fail(exc)
        raise  # unreachable: fail exits
    keys = ("n_images", "fid", "fid_real_floor", "c2st_auc", "c2st_auc_low", "c2st_auc_high", "precision", "recall",
            "coverage", "curation_score", "readable")
    typer.echo(json.dumps({k: report.get(k) for k in keys} | {"rejected": len(report["rejected"]),
                                                              "report": str(out or "reports/score.json")}, indent=2))


@app.command()
def loop(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    collect: Annotated[bool, typer.Option(help="run collect first (then `dvc add`).")] = True,
    autotune: Annotated[bool | None, typer.Option(
        "--autotune/--no-autotune",
        help="start from the last optimize's proposal, reports/next_params.yaml [default: loop.autotune].",
    )] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole loop as a Prefect flow (ephemeral Prefect API when PREFECT_API_URL is unset),
    under one MLflow parent run, and print where the results are.

    With loop.autotune (or --autotune) the tuned params of reports/next_params.yaml are applied
    first; `--params reports/next_params.yaml` runs with that whole file instead."""
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError

    logs.setup(verbose)
    set_ = [*(set_ or []), *([f"loop.autotune={str(autotune).lower()}"] if autotune is not None else [])]
    try:
        load_params(params, set_)  # fail on bad params before Prefect starts
        from genloop.core.lock import workspace_lock
        from genloop.core.workspace import Workspace

        with workspace_lock(Workspace.at(workspace), "genloop loop"):  # fail fast, before Prefect starts
            from genloop.orchestrate.flows import loop_flow

            result = loop_flow(params_file=str(params), overrides=set_ or [], workspace=str(workspace),
                               collect=collect)
    except GenloopError as exc:
        fail(exc)
        return
    typer.echo(result["where"])


def _transfer_data(verb: str, workspace: Path, verbose: bool) -> None:
    from genloop.core import logs
    from genloop.core.errors import GenloopError
    from genloop.mlops import dvc_remote

    logs.setup(verbose)
    try:
        remote = getattr(dvc_remote, verb)(workspace.resolve())
    except GenloopError as exc:
        fail(exc)
        return
    what = " and ".join(dvc_remote.data_targets(workspace.resolve()))
    typer.echo(f"{verb}: {what} {'to' if verb == 'push' else 'from'} DVC remote {remote.name!r} ({remote.url})")


@app.command("push")
def push_data(workspace: WorkspaceOpt = Path("."), verbose: VerboseOpt = False) -> None:
    """`dvc push` the data version (data.dvc, data/ledger.parquet.dvc) to the default DVC remote,
    with genloop's S3 endpoint (GENLOOP_S3_ENDPOINT_URL)."""
    _transfer_data("push", workspace, verbose)


@app.command("pull")
def pull_data(workspace: WorkspaceOpt = Path("."), verbose: VerboseOpt = False) -> None:
    """Restore data/raw and its ledger from the default DVC remote (`dvc pull data.dvc
    data/ledger.parquet.dvc`, genloop's S3 endpoint): on a fresh clone."""
    _transfer_data("pull", workspace, verbose)


services_app = typer.Typer(
    rich_markup_mode=None,
    help="Local services for scheduled runs on 127.0.0.1: an MLflow tracking server (sqlite, served "
    "artifacts), a Prefect server and a worker on the process work pool 'genloop-local'. "
    "State and logs live in <workspace>/.genloop/services/.",
    no_args_is_help=True,
)
app.add_typer(services_app, name="services")
HomeOpt = Annotated[
    Path | None, typer.Option("--dir", help="where state, databases and logs go [default: WORKSPACE/.genloop/services]")
]


def _services_home(workspace: Path, home: Path | None) -> Path:
    return (home or workspace / ".genloop" / "services").resolve()


@services_app.command("up")
def services_up(
    workspace: WorkspaceOpt = Path("."),
    home: HomeOpt = None,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Prefect server (API + UI) port.")] = 4200,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each service to become ready.")] = 240,
) -> None:
    """Start the MLflow server, the Prefect server and a process worker in the background."""
    from genloop.core import logs
    from genloop.core.errors import GenloopError
    from genloop.orchestrate import local_services

    logs.setup()
    try:
        state = local_services.up(_services_home(workspace, home), workspace.resolve(),
                            local_services.Ports(mlflow=mlflow_port, prefect=prefect_port), timeout=timeout)
    except GenloopError as exc:
        fail(exc)
        return
    typer.echo(f"services up in {state['startup_seconds']} s\n" + local_services.describe(state))


@services_app.command("down")
def services_down(workspace: WorkspaceOpt = Path("."), home: HomeOpt = None) -> None:
    """Stop exactly the processes `genloop services up` started (and their children)."""
    from genloop.core import logs
    from genloop.orchestrate import local_services

    logs.setup()
    stopped = local_services.down(_services_home(workspace, home))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(
    workspace: WorkspaceOpt = Path("."),
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the recorded state as JSON.")] = False,
) -> None:
    """Show the URLs, processes and logs of the local services."""
    from genloop.orchestrate import local_services

    state = local_services.status(_services_home(workspace, home))
    typer.echo(local_services.as_json(state) if as_json else local_services.describe(state))


@app.command("rollback")
def rollback_champion(
    to: Annotated[str | None, typer.Option(
        "--to", help="version to make champion (default: the previous champion).")] = None,
    reason: Annotated[str, typer.Option(
        "--reason", "-r", help="why; recorded as a tag with who and when.")] = "manual rollback",
    force: Annotated[bool, typer.Option(
        "--force", help="allow a version that never passed the promotion gate.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    verbose: VerboseOpt = False,
) -> None:
    """Move the `champion` alias back to the previous champion (or --to VERSION).

    Who, when and why are recorded as tags of both versions and in the model's champion
    history; a version that never passed the gate is refused unless --force.
    """
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.lock import workspace_lock
    from genloop.core.storage import write_json_atomic
    from genloop.core.workspace import Workspace
    from genloop.mlops import aliases, tracking

    logs.setup(verbose)
    try:
        cfg = load_params(params, set_ or [])
        ws = Workspace.at(workspace)
        tracking.configure(ws, cfg)
        with workspace_lock(ws, "genloop rollback"):
            summary = aliases.rollback(cfg.registry.model_name, to=to, reason=reason, force=force)
    except GenloopError as exc:
        fail(exc)
        return
    write_json_atomic(ws.report("rollback"), summary)
    typer.echo(json.dumps(summary, indent=2))


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved, validated params (a dry run: nothing else happens)."""
    import yaml

    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError

    try:
        cfg = load_params(params, set_ or [])
    except GenloopError as exc:
        fail(exc)
        return
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))


register_feedback_commands(app)  # genloop review, genloop feedback import|stats


def main() -> None:
    app(prog_name="genloop")


if __name__ == "__main__":
    sys.exit(main())
