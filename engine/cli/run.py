"""``engine run``: the projection daemon."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from engine.application import load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.daemon import build_runner
from engine.resources import open_resources
from engine.settings import Settings
from engine.topics import ensure_topic


async def _run(settings: Settings, until_caught_up: bool) -> None:
    application = load_application(settings.app)
    await ensure_topic(settings.kafka)
    async with open_resources(settings) as resources:
        runner = build_runner(application, resources)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runner.run(stop, until_caught_up=until_caught_up)


@app.command()
def run(
    until_caught_up: Annotated[
        bool,
        typer.Option("--until-caught-up", help="Apply what is in Kafka now, then exit."),
    ] = False,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the projection daemon: consume events and apply them to every projection.

    Stops cleanly on SIGTERM/SIGINT (finishes in-flight batches, commits offsets).
    Several daemons with the same ENGINE_RUNNER__GROUP_ID share the partitions.
    """
    configure(log_level)
    settings = load_settings()
    run_reporting_errors(lambda: asyncio.run(_run(settings, until_caught_up)))
