"""``engine migrate`` and ``engine relay``: the write side's operations."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer
from rich.console import Console

from engine.application import load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.postgres.migrations import migrate as apply_migrations
from engine.postgres.pool import create_pool
from engine.relay import OutboxRelay
from engine.settings import Settings

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


async def _migrate(settings: Settings) -> list[str]:
    application = load_application(settings.app)
    pool = await create_pool(settings.postgres)
    try:
        return await apply_migrations(pool, application.all_migrations())
    finally:
        await pool.close()


@app.command()
def migrate() -> None:
    """Create or update the database schema (engine tables and the application's write model)."""
    settings = load_settings()
    applied = run_reporting_errors(lambda: asyncio.run(_migrate(settings)))
    console = Console()
    if not applied:
        console.print("schema is up to date")
    for migration_id in applied:
        console.print(f"applied [green]{migration_id}[/green]")


async def _relay(settings: Settings, once: bool) -> int:
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    if once:
        return await relay.drain()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await relay.run(stop)
    return relay.stats.published


@app.command()
def relay(
    once: Annotated[
        bool, typer.Option("--once", help="Publish what is pending now, then exit.")
    ] = False,
    log_level: LogLevel = "info",
) -> None:
    """Publish outbox events to Kafka (at least once, in order per aggregate).

    Runs until SIGTERM/SIGINT. Several relays may run: one leads, the others
    stand by and take over if it dies.
    """
    configure(log_level)
    settings = load_settings()
    published = run_reporting_errors(lambda: asyncio.run(_relay(settings, once)))
    Console(stderr=True).print(f"relay: published {published} event(s)")
