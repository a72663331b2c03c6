"""``engine run``: the projection daemon."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from contextlib import AsyncExitStack
from typing import Annotated

import typer
import uvloop

from engine import metrics
from engine.application import Application, load_application
from engine.cli.app import ExitCode, app, err_console, load_settings, run_reporting_errors
from engine.cli.logs import configure
from engine.daemon import build_runner
from engine.drivers import kafka_address, postgres_address
from engine.ops_server import serving
from engine.resources import Resources, open_resources
from engine.retry import Backoff
from engine.settings import Settings, env_var
from engine.startup import StartupStopped, StartupWait, StopSignals, check_postgres, login_errors
from engine.supervisor import (
    STOP_MARGIN_S,
    Supervisor,
    follow_supervisor,
    worker_command,
    worker_count,
)
from engine.topics import ensure_topic

log = logging.getLogger("engine.run")


async def _run(
    settings: Settings, until_caught_up: bool, signals: StopSignals, metrics_port: int | None
) -> None:
    stop = signals.event()
    application = load_application(settings.app)
    async with AsyncExitStack() as stack:
        # First: a taken port fails at once, and probes answer "starting" meanwhile.
        ops = await stack.enter_async_context(serving(settings, metrics_port, "daemon"))
        try:
            resources = await _start(settings, application, stop, stack)
        except StartupStopped as exc:
            log.info("projection daemon stopped before it started (%s)", exc)
            return
        runner = build_runner(application, resources)
        if ops is not None:  # stops sampling before the resources close (the stack's order)
            await ops.sample_on(stack, resources)
        _tune_collector()
        running = asyncio.ensure_future(runner.run(stop, until_caught_up=until_caught_up))
        if ops is not None:
            ops.follow(running)
        await running


def _tune_collector() -> None:
    """Fewer cyclic-GC passes over what the daemon allocates per event.

    Every message makes dozens of container objects (the envelope, the event
    model, their dicts and lists) that reference counting frees on its own:
    they hold no cycles. With Python's default threshold (700 allocations) the
    collector still ran a young pass every few messages, and promoted batches
    in flight into older generations that it then walked again: a third of
    decoding's CPU in the decoding benchmark. Objects from start-up (modules,
    validators, settings) are frozen out of the collector's walks altogether.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


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


async def _supervise(
    settings: Settings,
    workers: int,
    log_level: str,
    signals: StopSignals,
    metrics_port: int | None,
) -> int:
    stop = signals.event()
    log.info(
        "starting %d workers in consumer group %s (supervisor pid %d)",
        workers,
        settings.runner.group_id,
        os.getpid(),
    )
    async with AsyncExitStack() as stack:
        # With a metrics port, the workers count into files this process sums (engine.metrics).
        files = stack.enter_context(metrics.workers_directory()) if metrics_port else None
        supervisor = Supervisor(
            worker_command(log_level, os.getpid()),
            workers,
            stop_timeout_s=settings.runner.shutdown_timeout_s + STOP_MARGIN_S,
            # Each worker would hit these again: stop, and exit with the worker's code.
            fatal_codes=(ExitCode.USAGE, ExitCode.CONFIGURATION, ExitCode.UNAVAILABLE),
            env=None if files is None else files.env,
            on_exit=None if files is None else files.exited,
        )
        ops = await stack.enter_async_context(
            serving(
                settings,
                metrics_port,
                "daemon",
                multiprocess_dir=None if files is None else files.directory,
            )
        )
        if ops is not None:
            await ops.sample_on(stack)
        running = asyncio.ensure_future(supervisor.run(stop))
        if ops is not None:
            ops.follow(running)
        return await running


def _workers(settings: Settings, requested: int | None, until_caught_up: bool) -> int:
    """How many processes this ``engine run`` is: the option, else the setting (0: per core)."""
    count = worker_count(
        settings.runner.workers if requested is None else requested,
        settings.kafka.partitions,
        os.cpu_count(),
    )
    if until_caught_up and count > 1:
        # Burst mode is one daemon's judgement of its own partitions: see engine.supervisor.
        if requested:
            err_console().print(
                "[red]error:[/red] --until-caught-up runs one process: drop --workers"
                " or pass --workers 1",
                highlight=False,
            )
            raise typer.Exit(ExitCode.USAGE)
        return 1
    return count


@app.command()
def run(
    until_caught_up: Annotated[
        bool,
        typer.Option(
            "--until-caught-up",
            help="Apply what is in Kafka now, then exit (always one process).",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Consumer processes in the group, under one supervisor. Default:"
            " ENGINE_RUNNER__WORKERS; 0 means one per core, at most one per partition;"
            " 1 runs the daemon in this process.",
            show_default=False,
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve /metrics, /health/live and /health/ready on this port (at"
            " ENGINE_OPS__HOST); with several workers the supervisor serves them for all."
            " Default: ENGINE_RUNNER__METRICS_PORT; unset or 0: none.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    supervisor_pid: Annotated[int | None, typer.Option("--supervisor-pid", hidden=True)] = None,
) -> None:
    """Run the projection daemon: consume events and apply them to every projection.

    Stops cleanly on SIGTERM/SIGINT (finishes in-flight batches, commits offsets).
    Several daemons with the same ENGINE_RUNNER__GROUP_ID share the partitions.
    At start-up it waits for PostgreSQL and Kafka, at most
    ENGINE_RUNNER__STARTUP_TIMEOUT_S (then exits with code 4); a stop meanwhile
    ends it cleanly.

    With more than one worker, this process supervises: it starts the workers
    (each an `engine run --workers 1`), restarts one that dies, forwards
    SIGTERM/SIGINT to them all and exits 0 once they all stopped cleanly; a
    worker that exits 2, 3 or 4 stops them all and the supervisor exits with
    that code.
    """
    signals = StopSignals()  # first: a stop sent while starting must not kill the daemon
    configure(log_level)
    if supervisor_pid is not None:  # a worker: stop (cleanly) when the supervisor dies
        follow_supervisor(supervisor_pid)
    settings = load_settings()
    count = _workers(settings, workers, until_caught_up)
    # A worker serves no port: its supervisor answers for it (engine.metrics).
    port = None if supervisor_pid is not None else _or(metrics_port, settings.runner.metrics_port)
    if count > 1:
        code = run_reporting_errors(
            lambda: asyncio.run(_supervise(settings, count, log_level, signals, port))
        )
        raise typer.Exit(code)
    # uvloop: the event loop in C. The daemon wakes for every Kafka fetch and every
    # store answer of five lanes, and the pure-Python loop's share of that showed.
    run_reporting_errors(lambda: uvloop.run(_run(settings, until_caught_up, signals, port)))


def _or(option: int | None, setting: int | None) -> int | None:
    return setting if option is None else option
