"""``engine dlq``: inspect and replay dead letters."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.application import load_application
from engine.cli.app import ExitCode, app, load_settings, run_reporting_errors
from engine.dlq import ReplayOutcome, replay
from engine.postgres.deadletters import DeadLetter, DeadLetterStore
from engine.postgres.pool import create_pool
from engine.resources import open_resources
from engine.settings import Settings

dlq_app = typer.Typer(
    help="Dead letters: events a projection could not decode or apply.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


async def _list(settings: Settings, include_replayed: bool, limit: int) -> list[DeadLetter]:
    pool = await create_pool(settings.postgres)
    try:
        return await DeadLetterStore(pool).list(include_replayed=include_replayed, limit=limit)
    finally:
        await pool.close()


@dlq_app.command("list")
def list_letters(
    include_replayed: Annotated[bool, typer.Option("--all", help="Include replayed ones.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
) -> None:
    """List dead letters, oldest first."""
    settings = load_settings()
    letters = run_reporting_errors(lambda: asyncio.run(_list(settings, include_replayed, limit)))
    table = Table("id", "projection", "event", "aggregate", "where", "error", "at", "replayed")
    for d in letters:
        table.add_row(
            str(d.id),
            d.projection,
            d.event_type or "?",
            _aggregate(d),
            f"{d.topic}[{d.partition}]@{d.offset}",
            d.error[:120],
            d.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            d.replayed_at.strftime("%Y-%m-%d %H:%M:%S") if d.replayed_at else "",
        )
    Console().print(table)
    Console(stderr=True).print(f"{len(letters)} dead letter(s)")


def _aggregate(letter: DeadLetter) -> str:
    if letter.aggregate_id is None:
        return ""
    version = "" if letter.aggregate_version is None else f" v{letter.aggregate_version}"
    behind = f" (parked behind {letter.parked_behind})" if letter.parked_behind else ""
    return f"{letter.aggregate_id}{version}{behind}"


async def _replay(settings: Settings, ids: list[int], every: bool) -> list[ReplayOutcome]:
    application = load_application(settings.app)
    async with open_resources(settings) as resources:
        store = DeadLetterStore(resources.pool)
        letters = (
            await store.list(limit=100_000)
            if every
            else [letter for i in ids if (letter := await store.get(i)) is not None]
        )
        missing = set(ids) - {letter.id for letter in letters}
        outcomes = [ReplayOutcome(i, False, "no such dead letter") for i in sorted(missing)]
        # A parked letter is replayed with its sequence, from the first: once per sequence.
        firsts: set[int] = set()
        for letter in letters:
            first = letter.parked_behind or letter.id
            if first not in firsts:
                firsts.add(first)
                outcomes.append(await replay(letter, application, resources))
        return outcomes


@dlq_app.command("replay")
def replay_letters(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids to replay.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Replay every pending dead letter.")] = False,
) -> None:
    """Apply dead letters again (after fixing their cause); exits 1 if any still fails.

    A letter parked behind another is replayed with its whole sequence, in
    order, from the first letter of its aggregate.
    """
    if not ids and not every:
        raise typer.BadParameter("name dead-letter ids, or pass --all")
    settings = load_settings()
    outcomes = run_reporting_errors(lambda: asyncio.run(_replay(settings, ids or [], every)))
    console = Console()
    if not outcomes:
        console.print("nothing to replay: no pending dead letters")
    for outcome in outcomes:
        mark = "[green]replayed[/green]" if outcome.ok else "[red]failed[/red]"
        console.print(f"{outcome.letter_id}: {mark} {outcome.detail}", highlight=False)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(ExitCode.FAILED)
