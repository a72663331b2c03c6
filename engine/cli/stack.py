"""``engine stack``: the native local stack (PostgreSQL, Redis, Kafka, Elasticsearch)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.cli.app import ExitCode, app, load_settings, run_reporting_errors
from engine.stack import SERVICE_NAMES, StackManager

stack_app = typer.Typer(
    help="Install, start, check, stop and wipe the local services, natively (no Docker). "
    "Data and logs live under ENGINE_STACK__DATA_DIR (default: ./.stack).",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")

Services = Annotated[
    list[str] | None,
    typer.Argument(help=f"Services to act on (default: all): {', '.join(SERVICE_NAMES)}."),
]


def _manager() -> StackManager:
    console = Console()
    return StackManager(load_settings(), lambda line: console.print(f"[cyan]stack[/cyan] {line}"))


@stack_app.command()
def up(services: Services = None) -> None:
    """Install what is missing (first run only), start the services and wait until healthy.

    Safe to run again: running services are only checked.
    """
    manager = _manager()
    run_reporting_errors(lambda: manager.up(services or ()))


@stack_app.command()
def down(services: Services = None) -> None:
    """Stop the services this stack started (by their recorded pid); nothing else."""
    manager = _manager()
    run_reporting_errors(lambda: manager.down(services or ()))


@stack_app.command()
def status(services: Services = None) -> None:
    """Show each service's state; exits 1 if any is not healthy."""
    manager = _manager()
    rows = run_reporting_errors(lambda: manager.status(services or ()))
    table = Table("service", "address", "pid", "state", "log")
    for row in rows:
        colour = "green" if row.healthy else "red"
        table.add_row(
            row.name,
            f"127.0.0.1:{row.port}",
            str(row.pid or "-"),
            f"[{colour}]{row.state}[/{colour}]",
            str(row.log),
        )
    Console().print(table)
    if not all(row.healthy for row in rows):
        raise typer.Exit(ExitCode.FAILED)


@stack_app.command()
def reset(
    services: Services = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop the services and wipe their data (downloads are kept)."""
    if not yes:
        typer.confirm("Wipe all local stack data?", abort=True)
    manager = _manager()
    run_reporting_errors(lambda: manager.reset(services or ()))
