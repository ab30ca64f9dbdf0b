"""CLI commands for reviewer feedback: `genloop review`, `genloop feedback import|stats`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.options import ParamsOpt, SetOpt, VerboseOpt, WorkspaceOpt
from genloop.cli.options import fail as _fail

feedback_app = typer.Typer(
    rich_markup_mode=None,
    help="The feedback store (feedback.store: a folder or s3:// prefix): reviewers' accept/reject "
    "decisions and 1-5 ratings on curated images, one immutable record per action.",
    no_args_is_help=True,
)


def review(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    host: Annotated[str, typer.Option(help="address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: a free one).", min=0, max=65535)] = 8765,
    reviewer: Annotated[str | None, typer.Option(
        help="name recorded with each action (default: your login name).")] = None,
    version: Annotated[str | None, typer.Option(
        help="model version of the curated batch (default: the latest, from reports/optimize.json).")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="allow a non-loopback --host (anyone who can reach it and has the token can write).",
    )] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Review the latest curated batch in a browser: accept, reject, rate 1-5; every action is saved at once.

    Prints the URL to open (it holds the access token; GENLOOP_REVIEW_TOKEN sets a fixed one). Ctrl-C stops.
    """
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.workspace import Workspace
    from genloop.feedback.review_app import serve

    logs.setup(verbose)

    def ready(url: str) -> None:
        typer.echo(f"genloop review: open {url}  (Ctrl-C to stop)")

    try:
        cfg = load_params(params, set_ or [])
        serve(cfg, Workspace.at(workspace), host=host, port=port, reviewer=reviewer, version=version,
              allow_remote=allow_remote, on_ready=ready)
    except GenloopError as exc:
        _fail(exc)


@feedback_app.command("import")
def import_feedback(
    file: Annotated[Path, typer.Argument(help="JSONL feedback records, or a Label Studio JSON export.")],
    format_: Annotated[str, typer.Option(
        "--format", "-f", help="auto | jsonl | label-studio (auto: a JSON list is a Label Studio export).",
    )] = "auto",
    reviewer: Annotated[str | None, typer.Option(
        help="reviewer for records that name none.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    verbose: VerboseOpt = False,
) -> None:
    """Import feedback records (JSONL) or a Label Studio JSON export into the feedback store.

    Every record is checked against the curated batches first: one bad record and nothing is
    imported (each problem is listed with its line or task). Importing a file again adds nothing.
    """
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.workspace import Workspace
    from genloop.feedback.importers import ImportRejected, import_file
    from genloop.feedback.store import FeedbackStore

    logs.setup(verbose)
    if format_ not in ("auto", "jsonl", "label-studio"):
        _fail(f"--format {format_!r}: use auto, jsonl or label-studio")
    try:
        cfg = load_params(params, set_ or [])
        ws = Workspace.at(workspace)
        store = FeedbackStore.open(cfg.feedback.store, ws)
        result = import_file(file, ws, store, format_, reviewer,  # type: ignore[arg-type]
                             default_model_name=cfg.registry.model_name)
    except ImportRejected as exc:
        from rich.console import Console

        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"[bold red]error:[/] {file}: {len(exc.problems)} invalid record(s); nothing was imported:")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False)
        raise typer.Exit(2) from None
    except GenloopError as exc:
        _fail(exc)
        return
    extra = []
    if result.already_present:
        extra.append(f"{result.already_present} already in the store")
    if result.skipped:
        extra.append(f"{result.skipped} skipped (no decision or rating, cancelled, or repeated)")
    typer.echo(f"imported {result.imported} feedback record(s) ({result.format}) into {result.store}"
               + (f"; {', '.join(extra)}" if extra else ""))


@feedback_app.command("stats")
def feedback_stats(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workspace: WorkspaceOpt = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Feedback per model version: images reviewed, accepted, rejected, acceptance rate, mean rating."""
    from genloop.core import logs
    from genloop.core.config import load_params
    from genloop.core.errors import GenloopError
    from genloop.core.workspace import Workspace
    from genloop.feedback.importers import stats
    from genloop.feedback.store import FeedbackStore

    logs.setup(verbose)
    try:
        cfg = load_params(params, set_ or [])
        ws = Workspace.at(workspace)
        store = FeedbackStore.open(cfg.feedback.store, ws)
        records = store.records()
        rows = stats(records, ws)
    except GenloopError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps({"store": store.location, "records": len(records), "versions": rows}, indent=2))
        return
    if not rows:
        typer.echo(f"no feedback yet in {store.location} (`genloop review` or `genloop feedback import`)")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"feedback in {store.location}: {len(records)} record(s)", box=box.SIMPLE_HEAD)
    for col in ("version", "reviewed", "accepted", "rejected", "accept %", "rated", "rating", "by"):
        table.add_column(col, justify="left" if col in ("version", "by") else "right")
    for r in rows:
        reviewed = f"{r['images_reviewed']}" + (f"/{r['curated_images']}" if r["curated_images"] is not None else "")
        rate = "–" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        mean = "–" if r["mean_rating"] is None else f"{r['mean_rating']:.2f}"
        table.add_row(f"v{r['model_version']}", reviewed, str(r["accepted"]), str(r["rejected"]), rate,
                      str(r["rated"]), mean, ", ".join(r["reviewers"]))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `review` and the `feedback` group (import, stats) to genloop's CLI."""
    app.command("review")(review)
    app.add_typer(feedback_app, name="feedback")
