"""``engine smoke``: one real round trip through each service's client."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.cli.app import app, load_settings, run_reporting_errors
from engine.settings import Settings
from engine.smoke import ROUND_TRIPS, RoundTrip


async def _run_all(settings: Settings, names: list[str]) -> list[RoundTrip]:
    return [(await ROUND_TRIPS[name](settings)).check() for name in names]


@app.command()
def smoke(
    services: Annotated[
        list[str] | None,
        typer.Argument(help=f"Services to check (default: all): {', '.join(ROUND_TRIPS)}."),
    ] = None,
) -> None:
    """Write a random value to each service and read it back through the engine's clients."""
    settings = load_settings()
    names = services or list(ROUND_TRIPS)
    unknown = [n for n in names if n not in ROUND_TRIPS]
    if unknown:
        raise typer.BadParameter(f"unknown service(s): {', '.join(unknown)}")
    results = run_reporting_errors(lambda: asyncio.run(_run_all(settings, names)))
    table = Table("service", "round trip", "ms")
    for result in results:
        table.add_row(result.service, "[green]ok[/green]", f"{result.seconds * 1000:.1f}")
    Console().print(table)
