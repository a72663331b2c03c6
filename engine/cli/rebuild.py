"""``engine rebuild``: refill a projection from the event log while the daemon runs."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from engine.application import load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.rebuild import RebuildReport, rebuild
from engine.resources import open_resources
from engine.settings import Settings


async def _rebuild(settings: Settings, name: str, keep_old: bool) -> RebuildReport:
    application = load_application(settings.app)
    async with open_resources(settings) as resources:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task(f"rebuilding {name}", total=None)
            return await rebuild(
                application,
                resources,
                name,
                lambda done, total: bar.update(task, completed=done, total=total),
                keep_old=keep_old,
            )


@app.command("rebuild")
def rebuild_command(
    projection: Annotated[
        str, typer.Argument(help="The projection to rebuild, e.g. order_search.")
    ],
    keep_old: Annotated[
        bool,
        typer.Option("--keep-old", help="Keep the previous generation instead of dropping it."),
    ] = False,
) -> None:
    """Replay the event log into a fresh copy of a projection, then switch readers to it.

    Live processing continues meanwhile; the switch is atomic for readers.
    Also the way to refill Redis after it lost its data.
    """
    settings = load_settings()
    report = run_reporting_errors(lambda: asyncio.run(_rebuild(settings, projection, keep_old)))
    Console().print(
        f"{report.projection}: generation {report.old_generation} -> {report.new_generation}, "
        f"{report.replayed} events replayed"
        + (f", {report.skipped} skipped (undecodable)" if report.skipped else "")
    )
