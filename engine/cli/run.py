"""``engine run``: the projection daemon."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Annotated

import typer

from engine.application import Application, load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.daemon import build_runner
from engine.drivers import kafka_address, postgres_address
from engine.resources import Resources, open_resources
from engine.retry import Backoff
from engine.settings import Settings, env_var
from engine.startup import StartupStopped, StartupWait, StopSignals, check_postgres, login_errors
from engine.topics import ensure_topic

log = logging.getLogger("engine.run")


async def _run(settings: Settings, until_caught_up: bool, signals: StopSignals) -> None:
    stop = signals.event()
    application = load_application(settings.app)
    async with AsyncExitStack() as stack:
        try:
            resources = await _start(settings, application, stop, stack)
        except StartupStopped as exc:
            log.info("projection daemon stopped before it started (%s)", exc)
            return
        runner = build_runner(application, resources)
        await runner.run(stop, until_caught_up=until_caught_up)


async def _start(
    settings: Settings, application: Application, stop: asyncio.Event, stack: AsyncExitStack
) -> Resources:
    """Wait for Postgres (migrated) and Kafka, then open the resources onto ``stack``."""
    runner = settings.runner
    startup = StartupWait(
        stop,
        timeout_s=runner.startup_timeout_s,
        setting=env_var("runner", "startup_timeout_s"),
        backoff=Backoff(runner.backoff_initial_s, runner.backoff_max_s),
    )
    postgres = postgres_address(settings.postgres)
    # Postgres first: a refused login or a missing schema stops at once, whatever Kafka does.
    await startup.until_available(
        lambda: check_postgres(settings.postgres, application.all_migrations()),
        "PostgreSQL",
        postgres,
    )
    await startup.until_available(
        lambda: ensure_topic(settings.kafka), "Kafka", kafka_address(settings.kafka)
    )

    async def open_all() -> Resources:
        # A failed open leaves nothing on the stack: the pool is its first step.
        with login_errors(settings.postgres):
            return await stack.enter_async_context(open_resources(settings))

    return await startup.until_available(open_all, "PostgreSQL", postgres)


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
    At start-up it waits for PostgreSQL and Kafka, at most
    ENGINE_RUNNER__STARTUP_TIMEOUT_S (then exits with code 4); a stop meanwhile
    ends it cleanly.
    """
    signals = StopSignals()  # first: a stop sent while starting must not kill the daemon
    configure(log_level)
    settings = load_settings()
    run_reporting_errors(lambda: asyncio.run(_run(settings, until_caught_up, signals)))
