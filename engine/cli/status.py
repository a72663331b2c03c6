"""``engine status``: where each projection stands, how far behind it is, what went wrong."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.application import load_application
from engine.cli.app import ExitCode, app, err_console, load_settings, run_reporting_errors
from engine.lane_state import UNHEALTHY, LaneState
from engine.resources import open_resources
from engine.settings import Settings
from engine.status import EngineStatus, ProjectionStatus, collect_status


async def _collect(settings: Settings) -> EngineStatus:
    application = load_application(settings.app)
    async with open_resources(settings) as resources:
        return await collect_status(settings, application, resources)


@app.command("status")
def status_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the status as one JSON document.")
    ] = False,
) -> None:
    """Show each projection's state, position, lag, dead letters, parked aggregates, last error.

    The state is attached, catching up, detached, stranded, parked, stalled or
    no daemon, with the reason. Exits 1 when a projection is failing now, has
    dead letters waiting, or is stranded, stalled or detached (lag alone is not
    a failure), or when the relay is stalled (events wait and nothing was
    published for relay.stalled_after_s); 4 when PostgreSQL or Kafka cannot be
    reached. For the services themselves, see `engine stack status`.
    """
    settings = load_settings()
    status = run_reporting_errors(lambda: asyncio.run(_collect(settings)))
    if as_json:
        typer.echo(status.model_dump_json(indent=2))
    else:
        Console().print(_table(status))
        Console().print(_outbox_line(status), highlight=False)
    unhealthy = [p.name for p in status.projections if not p.healthy]
    if unhealthy:
        err_console().print(
            f"needs attention: {', '.join(unhealthy)} (stranded, stalled or detached, a current"
            " error, dead letters or parked aggregates; see the state's reason, `engine dlq"
            " list` and `engine dlq replay`)",
            highlight=False,
        )
    if status.outbox.stalled:
        err_console().print(
            f"needs attention: the relay is stalled: {status.outbox.stalled_reason}",
            highlight=False,
        )
    if not status.healthy:
        raise typer.Exit(ExitCode.FAILED)


def _table(status: EngineStatus) -> Table:
    table = Table(title=f"projections of topic {status.topic}", title_justify="left")
    table.add_column("projection", no_wrap=True)
    table.add_column("state", overflow="fold")
    for numeric in ("position", "applied", "lag events", "lag seconds", "dead letters", "parked"):
        table.add_column(numeric, justify="right")
    table.add_column("last error", overflow="fold")
    for p in status.projections:
        table.add_row(
            p.name,
            _state(p),
            str(p.position),
            str(p.applied),
            str(p.lag_events),
            "?" if p.lag_seconds is None else f"{p.lag_seconds:.1f}",
            Text(str(p.dead_letters), style="red" if p.dead_letters else ""),
            Text(str(p.parked_aggregates), style="red" if p.parked_aggregates else ""),
            _last_error(p),
        )
    return table


def _state(p: ProjectionStatus) -> Text:
    # Red: someone should look; green: nothing to say; yellow: passing, or worth a look.
    if p.state in UNHEALTHY:
        style = "bold red"
    else:
        style = "green" if p.state is LaneState.ATTACHED else "yellow"
    state = Text(p.state.value, style=style)
    if p.state_reason:
        state.append(f": {p.state_reason[:240]}", style="")
    return state


def _last_error(p: ProjectionStatus) -> Text:
    if p.last_error is None:
        return Text("")
    at = p.last_error_at.strftime("%Y-%m-%d %H:%M:%S") if p.last_error_at else "?"
    if p.error_current:
        return Text.assemble(("failing ", "bold red"), f"since {at}: {p.last_error[:160]}")
    return Text(f"recovered; at {at}: {p.last_error[:160]}", style="dim")


def _outbox_line(status: EngineStatus) -> Text:
    box = status.outbox
    line = Text(f"outbox: {box.unpublished} unpublished")
    if box.oldest_age_seconds is not None:
        line.append(f", the oldest {box.oldest_age_seconds:.1f}s old")
    if box.stalled:
        line.append("; relay stalled", style="bold red")
        line.append(f": {box.stalled_reason}")
    return line
