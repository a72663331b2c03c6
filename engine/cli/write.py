"""``engine migrate`` and ``engine relay``: the write side's operations."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Annotated

import typer
from rich.console import Console

from engine.application import load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.drivers import kafka_address, postgres_address
from engine.ops_server import serving
from engine.postgres.migrations import migrate as apply_migrations
from engine.postgres.pool import create_pool
from engine.postgres.roles import grant_read_access
from engine.relay import OutboxRelay
from engine.retry import Backoff
from engine.settings import Settings, env_var
from engine.startup import StartupStopped, StartupWait, StopSignals, check_postgres
from engine.topics import ensure_topic

log = logging.getLogger("engine.relay")

LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


async def _migrate_and_grant(settings: Settings) -> tuple[list[str], str]:
    """Apply pending migrations, then set up the query side's read-only role."""
    application = load_application(settings.app)
    pool = await create_pool(settings.postgres)
    try:
        applied = await apply_migrations(pool, application.all_migrations())
        granted = await grant_read_access(
            pool, settings.postgres, settings.read.resolve(settings.postgres)
        )
        return applied, granted
    finally:
        await pool.close()


async def _migrate(settings: Settings) -> list[str]:
    """Migrate (and grant the read role); the ids of the migrations applied now."""
    applied, _ = await _migrate_and_grant(settings)
    return applied


@app.command()
def migrate() -> None:
    """Create or update the database schema and the query side's read-only role.

    Applies the engine's and the application's migrations that are not applied
    yet (safe to run concurrently and again), then creates or updates the
    ENGINE_READ__USER role with SELECT on the read model.
    """
    settings = load_settings()
    applied, granted = run_reporting_errors(lambda: asyncio.run(_migrate_and_grant(settings)))
    console = Console()
    if not applied:
        console.print("schema is up to date")
    for migration_id in applied:
        console.print(f"applied [green]{migration_id}[/green]")
    console.print(granted)


async def _relay(
    settings: Settings, once: bool, signals: StopSignals | None, metrics_port: int | None
) -> int:
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    if once or signals is None:
        return await relay.drain()
    stop = signals.event()
    async with AsyncExitStack() as stack:
        # First: a taken port fails at once, and probes answer "starting" meanwhile.
        ops = await stack.enter_async_context(serving(settings, metrics_port, "relay"))
        try:
            await _wait_for_services(settings, stop)
        except StartupStopped as exc:
            log.info("relay stopped before it started (%s)", exc)
            return 0
        if ops is not None:
            await ops.sample_on(stack)
        running = asyncio.ensure_future(relay.run(stop))
        if ops is not None:
            ops.follow(running)
        await running
    return relay.stats.published


async def _wait_for_services(settings: Settings, stop: asyncio.Event) -> None:
    """Wait for Postgres (migrated) and Kafka; the relay waits out later outages itself."""
    application = load_application(settings.app)
    startup = StartupWait(
        stop,
        timeout_s=settings.relay.startup_timeout_s,
        setting=env_var("relay", "startup_timeout_s"),
        backoff=Backoff(settings.relay.backoff_initial_s, settings.relay.backoff_max_s),
    )
    # Postgres first: a refused login or a missing schema stops at once, whatever Kafka does.
    await startup.until_available(
        lambda: check_postgres(settings.postgres, application.all_migrations()),
        "PostgreSQL",
        postgres_address(settings.postgres),
    )
    await startup.until_available(
        lambda: ensure_topic(settings.kafka), "Kafka", kafka_address(settings.kafka)
    )


@app.command()
def relay(
    once: Annotated[
        bool, typer.Option("--once", help="Publish what is pending now, then exit.")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve /metrics, /health/live and /health/ready on this port (at"
            " ENGINE_OPS__HOST). Default: ENGINE_RELAY__METRICS_PORT; unset or 0: none."
            " Not with --once.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Publish outbox events to Kafka (at least once, in order per aggregate).

    Runs until SIGTERM/SIGINT. Several relays may run: one leads, the others
    stand by and take over if it dies. At start-up it waits for PostgreSQL and
    Kafka, at most ENGINE_RELAY__STARTUP_TIMEOUT_S (then exits with code 4); a
    stop meanwhile ends it cleanly.
    """
    # First: a stop sent while the relay starts must not kill it.
    signals = None if once else StopSignals()
    configure(log_level)
    settings = load_settings()
    port = settings.relay.metrics_port if metrics_port is None else metrics_port
    published = run_reporting_errors(lambda: asyncio.run(_relay(settings, once, signals, port)))
    if once:  # the command's answer
        Console(stderr=True).print(f"relay: published {published} event(s)")
    else:  # a daemon's last word: a log line like the others (JSON when not a terminal)
        log.info("relay stopped; it published %d event(s)", published)
