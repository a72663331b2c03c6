"""``engine demo``: load the application's sample data through the write side."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from engine.application import Application, load_application
from engine.cli.app import app, load_settings, run_reporting_errors
from engine.cli.write import _migrate
from engine.commands import CommandBus
from engine.demo import DemoLoader, DemoSize, DemoSummary
from engine.errors import ConfigurationError
from engine.postgres.pool import create_pool
from engine.settings import Settings

# About 30 s on a 2-core machine with the whole stack running (~24,000 commands).
DEFAULT_CUSTOMERS = 2000
DEFAULT_ORDERS = 5000


@dataclass(frozen=True)
class _Loaded:
    application: str
    migrations: list[str]
    summary: DemoSummary
    elapsed_s: float


def _loader(application: Application, spec: str) -> DemoLoader:
    if application.demo is None:
        raise ConfigurationError(
            f"the application {application.name!r} ({spec}, ENGINE_APP) has no demo loader: "
            "give its Application a demo=..."
        )
    return application.demo


async def _load(
    settings: Settings, size: DemoSize, seed: int, concurrency: int, console: Console
) -> _Loaded:
    application = load_application(settings.app)
    loader = _loader(application, settings.app)
    migrations = await _migrate(settings)
    # One connection per worker, so the bound is the workers, not the pool.
    postgres = settings.postgres.model_copy(
        update={"pool_max_size": max(settings.postgres.pool_max_size, concurrency)}
    )
    pool = await create_pool(postgres)
    try:
        bus = CommandBus(pool, application.handlers, postgres)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(f"{application.name} demo, seed {seed}: commands", total=None)
            started = time.monotonic()
            summary = await loader(
                bus,
                size,
                seed,
                concurrency,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
            elapsed = time.monotonic() - started
    finally:
        await pool.close()
    return _Loaded(application.name, migrations, summary, elapsed)


def _as_json(loaded: _Loaded) -> str:
    body: dict[str, Any] = {
        "application": loaded.application,
        "migrations_applied": loaded.migrations,
        "elapsed_s": round(loaded.elapsed_s, 3),
        **dataclasses.asdict(loaded.summary),
    }
    return json.dumps(body, indent=2)


def _outcome(summary: DemoSummary) -> str:
    if summary.commands and summary.new == 0:
        return (
            f"nothing new: seed {summary.seed} was already loaded "
            f"(all {summary.commands:,} commands were duplicates)"
        )
    if summary.duplicates:
        # Partly loaded before: an interrupted run, smaller sizes, or data shared across seeds.
        return f"{summary.new:,} new, {summary.duplicates:,} already applied by an earlier run"
    return f"{summary.new:,} new"


def _print_report(console: Console, loaded: _Loaded) -> None:
    summary = loaded.summary
    for migration_id in loaded.migrations:
        console.print(f"applied [green]{migration_id}[/green]")
    rate = summary.commands / loaded.elapsed_s if loaded.elapsed_s else 0.0
    console.print(
        f"{loaded.application} demo, seed {summary.seed}: {summary.commands:,} commands in "
        f"{loaded.elapsed_s:.1f} s ({rate:,.0f}/s): {_outcome(summary)}",
        highlight=False,
    )
    counts = Table("sample", "count", show_edge=False)
    for name, value in summary.counts.items():
        counts.add_row(name.replace("_", " "), f"{value:,}")
    for group, values in summary.breakdowns.items():
        for key, value in values.items():
            counts.add_row(f"{group.replace('_', ' ')}: {key}", f"{value:,}")
    console.print(counts)
    if summary.samples:
        samples = Table("to try in queries", "value", show_edge=False)
        for key, text in summary.samples.items():
            samples.add_row(key.replace("_", " "), text)
        console.print(samples)
    console.print(
        "The events are in the outbox: `engine relay` publishes them to Kafka and "
        "`engine run` projects them."
    )


@app.command("demo")
def demo_command(
    customers: Annotated[
        int, typer.Option("--customers", min=1, help="How many customers to register.")
    ] = DEFAULT_CUSTOMERS,
    orders: Annotated[
        int, typer.Option("--orders", min=0, help="How many orders to place among them.")
    ] = DEFAULT_ORDERS,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            help="Names the sample: the same seed gives the same data and the same ids, "
            "so a rerun adds nothing; another seed adds another sample beside it.",
        ),
    ] = 42,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, max=64, help="Commands in flight at once."),
    ] = 8,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout (for scripts).")
    ] = False,
) -> None:
    """Load a realistic sample (products, customers, orders through their life cycle).

    Everything goes through the command bus, so the events land in the outbox
    as any command's would; run `engine relay` and `engine run` to publish and
    project them. Migrates the database first if needed. Idempotent: the same
    seed and sizes a second time find every command already applied and record
    nothing; a larger --orders with the same seed adds only the new orders.
    """
    settings = load_settings()
    size = DemoSize(customers=customers, orders=orders)
    # The progress bar goes to stderr, so that stdout holds only the report (or the JSON).
    loaded = run_reporting_errors(
        lambda: asyncio.run(_load(settings, size, seed, concurrency, Console(stderr=True)))
    )
    if as_json:
        typer.echo(_as_json(loaded))
    else:
        _print_report(Console(), loaded)
