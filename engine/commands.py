"""The write side's command bus: one command, one transaction, its events in the outbox.

``CommandBus.execute`` opens a transaction, claims the command id in
``engine_commands``, runs the handler (which reads and changes the write model
through the unit of work and records events), appends the events to the event
log and outbox, stores the result and commits. Either all of that happens or
none of it does.

Idempotency: a command id is claimed with ``INSERT ... ON CONFLICT DO
NOTHING``. A concurrent duplicate blocks on that insert until the first
transaction ends; if the first committed, the duplicate finds its result and
returns it unchanged (recording nothing); if the first rolled back, the
duplicate proceeds as the first. The same id with different content is a
client bug and is refused.

The transaction's shape, in round trips: ``BEGIN``; the claim; the handler's
statements (one or two for the orders domain); one statement that appends the
events to the log and the outbox, stores the command's result in the claim row
and sends the relay's ``NOTIFY`` (:func:`engine.postgres.outbox.append_for_command`);
``COMMIT``. Folding the last three writes into one statement changes none of
the arguments: the claim is still the first write, so a duplicate still blocks
on it until this transaction ends and then reads the result stored by it (the
same transaction wrote it, so it is there exactly when the claim row is); the
transaction id is still drawn before any position (the append's materialized
``tx``); a ``NOTIFY`` is queued until commit and dropped on rollback wherever
in the transaction it is sent. The claim cannot move to the end (to save its
round trip): a concurrent duplicate would then run its handler against the
first's uncommitted changes and fail with a conflict instead of returning the
first's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine import metrics
from engine.correlation import current as current_correlation
from engine.drivers import START_HINT, postgres_address, postgres_errors
from engine.errors import (
    CommandIdReusedError,
    ConfigurationError,
    ConflictError,
    InvalidInputError,
    ServiceUnavailableError,
    ValidationFailedError,
)
from engine.events import DomainEvent
from engine.postgres import outbox
from engine.postgres.pool import Connection
from engine.settings import PostgresSettings

log = logging.getLogger("engine.commands")


class Command(BaseModel):
    """Base of every command: structurally validated, immutable, with an idempotency id."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    command_id: UUID = Field(default_factory=uuid4)
    correlation_id: UUID | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold NUL: refuse it here, naming the field,
        # rather than fail deep inside the transaction.
        if _has_nul(value):
            raise ValueError("must not contain NUL (\\u0000) characters")
        return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class CommandResult(BaseModel):
    """What a command did: the aggregate, its new version and a consistency token."""

    model_config = ConfigDict(frozen=True)

    command_id: UUID
    aggregate_id: str
    version: int
    # Global position of the last event recorded: a reader can wait until its
    # projection has applied this position (read-your-writes).
    position: int | None
    event_types: list[str]
    duplicate: bool = False


C = TypeVar("C", bound=Command)


@dataclass(frozen=True)
class _Recorded:
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event: DomainEvent


@dataclass
class UnitOfWork:
    """What a handler gets: the transaction's connection and a place to record events."""

    conn: Connection
    command: Command
    occurred_at: datetime
    recorded: list[_Recorded] = field(default_factory=list)

    def record(
        self, aggregate_type: str, aggregate_id: str, aggregate_version: int, event: DomainEvent
    ) -> None:
        """Record ``event`` as version ``aggregate_version`` of the aggregate."""
        self.recorded.append(_Recorded(aggregate_type, aggregate_id, aggregate_version, event))


# A handler changes the write model and records events; it returns the id and
# new version of the aggregate the command was about.
Handler = Callable[[UnitOfWork, Any], Awaitable[tuple[str, int]]]


def validate_command(model: type[C], data: Mapping[str, Any]) -> C:
    """Build a command from untrusted input; the first problem names its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise ValidationFailedError(where, first["msg"]) from exc


def _payload_hash(command: Command) -> str:
    body = command.model_dump_json(exclude={"command_id", "correlation_id"})
    return hashlib.sha256(f"{type(command).__name__}:{body}".encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CommandBus:
    """Runs commands through their handlers, atomically and idempotently."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        handlers: Mapping[type[Command], Handler],
        postgres: PostgresSettings,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._pool = pool
        self._handlers = dict(handlers)
        self._postgres = postgres
        self._clock = clock

    async def execute(self, command: Command) -> CommandResult:
        """Run ``command`` in one transaction; counted in ``engine_commands_total`` by outcome."""
        started = time.perf_counter()
        outcome = "error"
        result: CommandResult | None = None
        try:
            result = await self._execute_translated(command)
            outcome = "duplicate" if result.duplicate else "accepted"
            return result
        except InvalidInputError:
            outcome = "rejected"
            raise
        except ConflictError:
            outcome = "conflict"
            raise
        except ServiceUnavailableError:
            outcome = "unavailable"
            raise
        finally:
            kind = type(command).__name__
            seconds = time.perf_counter() - started
            metrics.COMMANDS.labels(kind, outcome).inc()
            metrics.COMMAND_SECONDS.labels(kind, outcome).observe(seconds)
            _log_outcome(command, kind, outcome, seconds, result if outcome != "error" else None)

    async def _execute_translated(self, command: Command) -> CommandResult:
        handler = self._handlers.get(type(command))
        if handler is None:
            raise ConfigurationError(f"no handler registered for {type(command).__name__}")
        # What a driver error means for a command is decided here; what is left
        # (the server unreachable, a missing table...) the seam translates.
        with postgres_errors(postgres_address(self._postgres), START_HINT):
            try:
                return await self._execute(command, handler)
            except asyncpg.UniqueViolationError as exc:
                # Another writer recorded the same aggregate version first.
                raise ConflictError(
                    f"a concurrent command changed it first ({exc.detail})"
                ) from exc
            except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError) as exc:
                raise ConflictError("a concurrent command changed it first; retry") from exc
            except asyncpg.DataError as exc:
                # A value the database refuses (out of range, bad encoding) that the
                # command's validation let through: still the input's fault.
                raise ValidationFailedError(type(command).__name__, str(exc)) from exc

    async def _execute(self, command: Command, handler: Handler) -> CommandResult:
        digest = _payload_hash(command)
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                "INSERT INTO engine_commands (command_id, command_type, payload_hash, result)"
                " VALUES ($1, $2, $3, '{}'::jsonb) ON CONFLICT (command_id) DO NOTHING"
                " RETURNING true",
                command.command_id,
                type(command).__name__,
                digest,
            )
            if not claimed:
                return await _previous_result(conn, command, digest)
            work = UnitOfWork(conn=conn, command=command, occurred_at=self._clock())
            aggregate_id, version = await handler(work, command)
            if not work.recorded:
                return await _record_result(conn, command, aggregate_id, version)
            outcome = outbox.Outcome(command.command_id, aggregate_id, version)
            appended = await outbox.append_for_command(conn, _rows(work), outcome)
            return CommandResult(
                command_id=command.command_id,
                aggregate_id=aggregate_id,
                version=version,
                position=appended[-1][0],
                event_types=[event_type for _, event_type in appended],
            )


async def _record_result(
    conn: Connection, command: Command, aggregate_id: str, version: int
) -> CommandResult:
    """The result of a command that recorded no event (the append stores it otherwise)."""
    result = CommandResult(
        command_id=command.command_id,
        aggregate_id=aggregate_id,
        version=version,
        position=None,
        event_types=[],
    )
    await conn.execute(
        "UPDATE engine_commands SET result = $2::jsonb WHERE command_id = $1",
        command.command_id,
        result.model_dump_json(),
    )
    return result


async def _previous_result(conn: Connection, command: Command, digest: str) -> CommandResult:
    row = await conn.fetchrow(
        "SELECT command_type, payload_hash, result FROM engine_commands WHERE command_id = $1",
        command.command_id,
    )
    if row is None:  # cannot happen: the claim conflicted on this very id
        raise ConflictError(f"command {command.command_id} vanished while being read; retry")
    if row["payload_hash"] != digest or row["command_type"] != type(command).__name__:
        raise CommandIdReusedError(
            f"command id {command.command_id} was already used for a different "
            f"{row['command_type']}; use a new id for a new command"
        )
    stored = json.loads(row["result"])
    return CommandResult.model_validate({**stored, "duplicate": True})


def correlation_of(command: Command) -> UUID:
    """The correlation id its events carry: the command's own, else the one bound for the
    work in progress (an API request's ``X-Correlation-ID``), else the command's id."""
    return command.correlation_id or current_correlation() or command.command_id


def _log_outcome(
    command: Command, kind: str, outcome: str, seconds: float, result: CommandResult | None
) -> None:
    """One line per command, carrying what follows it into its events' log lines."""
    fields: dict[str, object] = {
        "command": kind,
        "command_id": str(command.command_id),
        "outcome": outcome,
        "correlation_id": str(correlation_of(command)),
        "duration_ms": round(seconds * 1000, 2),
    }
    if result is not None:
        fields.update(aggregate_id=result.aggregate_id, aggregate_version=result.version)
        log.info("%s %s: %s v%d", kind, outcome, result.aggregate_id, result.version, extra=fields)
    else:
        level = logging.WARNING if outcome in ("error", "unavailable") else logging.INFO
        log.log(level, "%s %s (%.1f ms)", kind, outcome, seconds * 1000, extra=fields)


def _rows(work: UnitOfWork) -> list[outbox.EventRow]:
    command = work.command
    correlation = correlation_of(command)
    return [
        (
            uuid4(),
            item.event.event_type,
            item.event.schema_version,
            item.aggregate_type,
            item.aggregate_id,
            item.aggregate_version,
            work.occurred_at,
            correlation,
            command.command_id,
            item.event.model_dump_json(),
        )
        for item in work.recorded
    ]
