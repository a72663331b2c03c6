"""The dead-letter store: events that could not be decoded or applied, kept with their bytes.

A dead letter records the projection it failed in (``*`` when the message
could not be decoded at all, so no projection got it), where it came from
(topic, partition, offset), the original key, value and headers, and the error.
It never blocks a partition: the runner records it and moves on. ``engine dlq
replay`` applies it again once the cause is fixed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine.postgres.migrations import Migration

ALL_PROJECTIONS = "*"

DEAD_LETTER_MIGRATIONS = (
    Migration(
        "engine-0003-dead-letters-checkpoints",
        """
        CREATE TABLE engine_dead_letters (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            projection  text NOT NULL,
            topic       text NOT NULL,
            partition   integer NOT NULL,
            "offset"    bigint NOT NULL,
            key         bytea,
            value       bytea,
            headers     jsonb NOT NULL,
            event_type  text,
            error       text NOT NULL,
            attempts    integer NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            replayed_at timestamptz,
            UNIQUE (projection, topic, partition, "offset")
        );
        CREATE TABLE engine_projection_checkpoints (
            projection     text PRIMARY KEY,
            last_position  bigint NOT NULL DEFAULT 0,
            last_event_at  timestamptz,
            applied        bigint NOT NULL DEFAULT 0,
            last_error     text,
            last_error_at  timestamptz,
            updated_at     timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)


@dataclass(frozen=True)
class NewDeadLetter:
    projection: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    event_type: str | None
    error: str
    attempts: int


@dataclass(frozen=True)
class DeadLetter(NewDeadLetter):
    """A recorded dead letter: what was recorded, plus its id and its history."""

    id: int
    created_at: datetime
    replayed_at: datetime | None


_SELECT = (
    'SELECT id, projection, topic, partition, "offset", key, value, headers, event_type,'
    " error, attempts, created_at, replayed_at FROM engine_dead_letters"
)


def _letter(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(**{**dict(row), "headers": json.loads(row["headers"])})


class DeadLetterStore:
    """Dead letters in Postgres. Recording the same (projection, message) twice keeps one."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, letters: Sequence[NewDeadLetter]) -> None:
        if not letters:
            return
        await self._pool.executemany(
            'INSERT INTO engine_dead_letters (projection, topic, partition, "offset", key, value,'
            " headers, event_type, error, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb,"
            ' $8, $9, $10) ON CONFLICT (projection, topic, partition, "offset") DO NOTHING',
            [
                (
                    d.projection,
                    d.topic,
                    d.partition,
                    d.offset,
                    d.key,
                    d.value,
                    json.dumps(d.headers),
                    d.event_type,
                    d.error[:4000],
                    d.attempts,
                )
                for d in letters
            ],
        )

    async def list(self, *, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE $1 OR replayed_at IS NULL ORDER BY id LIMIT $2",
            include_replayed,
            limit,
        )
        return [_letter(r) for r in rows]

    async def get(self, letter_id: int) -> DeadLetter | None:
        row = await self._pool.fetchrow(f"{_SELECT} WHERE id = $1", letter_id)
        return _letter(row) if row is not None else None

    async def mark_replayed(self, letter_id: int) -> None:
        await self._pool.execute(
            "UPDATE engine_dead_letters SET replayed_at = now() WHERE id = $1", letter_id
        )

    async def count(self, projection: str | None = None) -> int:
        value = await self._pool.fetchval(
            "SELECT count(*) FROM engine_dead_letters WHERE replayed_at IS NULL"
            " AND ($1::text IS NULL OR projection = $1 OR projection = '*')",
            projection,
        )
        return int(value)
