"""Testing command handlers: given prior commands, when a command runs, expect events or an error.

Handlers here do not rebuild aggregates from events: they read and write a
normalized write model through the unit of work's connection (see
``projections/orders/handlers.py``), and the events they record are outputs,
never inputs. So "given these prior events" cannot be honoured by inserting
events into the log; the handler would not see them. The honest equivalent is
"given these prior commands": they run through the same handlers and
``CommandBus`` as production, which leaves the write model and the event log
exactly as the real history would. (A test may also set the write model up
with its own SQL on the pool; the handler sees that too, but the event log
then holds no matching history.)

The command under test runs through the real ``CommandBus`` in its own
transaction; its events are read back from the event log by causation id
(the command id) and decoded through the application's registry, so the
scenario checks what was committed and that it decodes, not what the handler
meant to record. A typed rejection (:class:`~engine.InvalidInputError` or
:class:`~engine.ConflictError`) becomes the outcome's error; anything else (a
bug, a missing migration, a database that is down) propagates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from engine.application import Application
from engine.commands import Command, CommandBus, CommandResult
from engine.errors import ConflictError, EngineError, InvalidInputError
from engine.events import DomainEvent, EventEnvelope
from engine.settings import PostgresSettings

E = TypeVar("E", bound=EngineError)

_CAUSED_BY = """
    SELECT position, event_id, event_type, schema_version, aggregate_type, aggregate_id,
        aggregate_version, occurred_at, correlation_id, causation_id, payload::text AS payload
    FROM engine_event_log WHERE causation_id = $1 ORDER BY position
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outcome:
    """What the command under test did: its result and events, or the typed error it raised."""

    command: Command
    result: CommandResult | None = None
    envelopes: Sequence[EventEnvelope] = ()
    events: Sequence[DomainEvent] = ()
    error: EngineError | None = field(default=None)

    def expect_events(self, *expected: DomainEvent | type[DomainEvent]) -> list[DomainEvent]:
        """Assert the events recorded, in order: an instance must be equal, a class matches type.

        Returns the events, for further checks.
        """
        if self.error is not None:
            raise AssertionError(
                f"{type(self.command).__name__} raised {type(self.error).__name__}:"
                f" {self.error}; expected events {_names(expected)}"
            ) from self.error
        events = list(self.events)
        if len(events) != len(expected) or not all(
            _matches(want, got) for want, got in zip(expected, events, strict=True)
        ):
            raise AssertionError(
                f"{type(self.command).__name__} recorded {events!r};\nexpected {list(expected)!r}"
            )
        return events

    def expect_error(self, error_type: type[E], match: str | None = None) -> E:
        """Assert the command was rejected with ``error_type`` (and ``match`` in its message)."""
        error = self.error
        if not isinstance(error, error_type):
            got = (
                f"{type(error).__name__}: {error}"
                if error is not None
                else f"success, recording {_names(self.events)}"
            )
            raise AssertionError(
                f"{type(self.command).__name__}: expected {error_type.__name__}, got {got}"
            ) from error
        if match is not None and match not in str(error):
            raise AssertionError(f"{error_type.__name__} {str(error)!r} does not mention {match!r}")
        return error


class CommandScenario:
    """Runs an application's commands through the real ``CommandBus`` on a migrated database.

    ``pool`` must reach a database migrated with ``app.all_migrations()``;
    use a test database, since the scenario leaves its history there.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        app: Application,
        postgres: PostgresSettings,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.app = app
        self.bus = CommandBus(pool, app.handlers, postgres, clock=clock)
        self._pool = pool

    async def given(self, *commands: Command) -> list[CommandResult]:
        """Run prior commands in order; each must succeed (a failing one is a broken test)."""
        results: list[CommandResult] = []
        for command in commands:
            try:
                results.append(await self.bus.execute(command))
            except EngineError as exc:
                raise AssertionError(
                    f"given {type(command).__name__} failed: {type(exc).__name__}: {exc}"
                ) from exc
        return results

    async def when(self, command: Command) -> Outcome:
        """Run the command under test; return its events (decoded) or its typed error."""
        try:
            result = await self.bus.execute(command)
        except (InvalidInputError, ConflictError) as exc:
            return Outcome(command, error=exc)
        # A duplicate records nothing: the events under its id belong to the first run.
        envelopes = [] if result.duplicate else await self._caused_by(command)
        events = [self.app.registry.decode(envelope) for envelope in envelopes]
        return Outcome(command, result, envelopes, events)

    async def _caused_by(self, command: Command) -> list[EventEnvelope]:
        rows = await self._pool.fetch(_CAUSED_BY, command.command_id)
        return [
            EventEnvelope.model_validate({**dict(row), "payload": json.loads(row["payload"])})
            for row in rows
        ]


def _matches(want: DomainEvent | type[DomainEvent], got: DomainEvent) -> bool:
    if isinstance(want, type):
        return isinstance(got, want)
    return want == got


def _names(events: Sequence[DomainEvent | type[DomainEvent]]) -> list[str]:
    return [e.__name__ if isinstance(e, type) else type(e).__name__ for e in events]
