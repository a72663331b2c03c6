"""The dead-letter store: events that could not be decoded or applied, kept with their bytes.

A dead letter records the projection it failed in (``*`` when the message
could not be decoded at all, so no projection got it), where it came from
(topic, partition, offset), the original key, value and headers, and the error.
It never blocks a partition: the runner records it and moves on. ``engine dlq
replay`` applies it again once the cause is fixed.

Dead letters are ordered per aggregate. A document projection folds an
aggregate's events by version and skips any version not above the stored one,
so folding the events after a dead letter over its hole would lose it twice:
the read model shows a state that never existed, and replaying the letter
later changes nothing. So the first letter of an aggregate (whose version is
known) *parks* it for its projection (or for every projection, ``*``): a row in
``engine_parked`` names the first letter and its version, and later events of
that aggregate with a higher version, and the first letter's own message
delivered again (after a restart, or re-read by a catch-up that decodes it
fine: the event after a version gap, :mod:`engine.gaps`), are recorded as
letters *parked behind* it (``parked_behind``, with their original bytes)
instead of being applied. Other aggregates flow on. Other events at or below
the first letter's version are not behind the hole and are applied as usual
(another message claiming the same version is not the one that failed).

A message whose envelope cannot be read at all (no aggregate version) is
recorded with the Kafka key as its aggregate, but parks nothing: where it
stood in the aggregate's history, or whether it belongs to it at all, is
unknown, and parking the aggregate for ever behind bytes that may never have
been one of its events would turn any garbage into a stopped aggregate.

Why a parked event cannot be lost to a concurrent replay. A replay
(:mod:`engine.dlq`) takes the park row ``FOR UPDATE``, reads the letters
parked behind it, applies them, marks them replayed and deletes the row, all
in one transaction. A lane records a parked letter in a transaction that first
takes the park rows it parks behind ``FOR SHARE``: it waits for a running
replay, and once that commits the row is gone, the lane sees its aggregate
unparked and applies the event itself (after the whole sequence: the replay
applied it first). If the lane commits first, the replay, which reads the
letters only after taking its lock, finds and applies the new letter. Either
way each event is applied or parked behind a replay that has not read yet.
The lane's first look is not a query but the set of its projection's parked
aggregates it keeps in memory (loaded by :meth:`DeadLetterStore.parked_ids`,
kept up to date by whoever parks on its behalf): it can only miss a row that
does not exist yet. Park rows are created only by the dispatcher (before it
dispatches the batch whose letter it is, adding the aggregate to every lane's
set) and by the lane itself, both before that lane reaches the aggregate's
later events; a replay only deletes rows. A daemon that is assigned
partitions reloads the set, since another daemon may have parked aggregates
on them. A set that still names an aggregate a replay has unparked costs one
locked look, which finds the row gone. Waits for these locks are bounded
(``lock_timeout``) and retried.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from engine.postgres.migrations import Migration
from engine.postgres.pool import Connection

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
    Migration(
        "engine-0009-parked-aggregates",
        """
        ALTER TABLE engine_dead_letters
            ADD COLUMN aggregate_id      text,
            ADD COLUMN aggregate_version bigint,
            ADD COLUMN parked_behind     bigint REFERENCES engine_dead_letters (id);
        CREATE INDEX engine_dead_letters_parked_behind ON engine_dead_letters (parked_behind)
            WHERE parked_behind IS NOT NULL;
        CREATE TABLE engine_parked (
            projection   text NOT NULL,
            aggregate_id text NOT NULL,
            version      bigint NOT NULL,
            first_letter bigint NOT NULL REFERENCES engine_dead_letters (id),
            reason       text NOT NULL,
            parked_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (projection, aggregate_id)
        );
        CREATE INDEX engine_parked_first_letter ON engine_parked (first_letter);
        """,
    ),
)

# How long a lane or a replay waits for a park row another transaction holds; past it,
# the step fails and is retried (lane) or reported (replay), never waits unbounded.
LOCK_TIMEOUT = "10s"


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
    # The aggregate and its version, when the message tells them (see the module doc).
    aggregate_id: str | None = field(default=None, kw_only=True)
    aggregate_version: int | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class DeadLetter(NewDeadLetter):
    """A recorded dead letter: what was recorded, plus its id and its history."""

    id: int
    created_at: datetime
    replayed_at: datetime | None
    # The first letter of the aggregate this one is parked behind (None: not parked).
    parked_behind: int | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Parked:
    """An aggregate parked for a projection (``*``: every one) behind its first letter."""

    projection: str
    aggregate_id: str
    version: int
    first_letter: int
    reason: str
    parked_at: datetime
    letters: int
    """Letters parked behind the first one, not replayed yet."""


_SELECT = (
    'SELECT id, projection, topic, partition, "offset", key, value, headers, event_type,'
    " error, attempts, created_at, replayed_at, aggregate_id, aggregate_version, parked_behind"
    " FROM engine_dead_letters"
)

_INSERT = (
    'INSERT INTO engine_dead_letters (projection, topic, partition, "offset", key, value,'
    " headers, event_type, error, attempts, aggregate_id, aggregate_version, parked_behind)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13)"
    ' ON CONFLICT (projection, topic, partition, "offset") DO NOTHING RETURNING id'
)

_PARKED = (
    "SELECT p.projection, p.aggregate_id, p.version, p.first_letter, p.reason, p.parked_at,"
    " (SELECT count(*) FROM engine_dead_letters d WHERE d.parked_behind = p.first_letter"
    " AND d.replayed_at IS NULL) AS letters FROM engine_parked p"
)


def _letter(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(**{**dict(row), "headers": json.loads(row["headers"])})


@dataclass(frozen=True)
class Parking:
    """What :meth:`DeadLetterStore.park_behind` did."""

    held: set[tuple[int, int]]
    """(partition, offset) of the letters parked: not to be applied."""
    parked: set[str]
    """The letters' aggregates that are parked (some of their events may still apply)."""


class DeadLetterStore:
    """Dead letters in Postgres. Recording the same (projection, message) twice keeps one."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, letters: Sequence[NewDeadLetter]) -> None:
        """Record ``letters``; the first of an aggregate (version known) parks it.

        A letter of an aggregate already parked for its projection is parked
        behind that aggregate's first letter. A letter recorded before (the
        same message delivered again) changes nothing.
        """
        if not letters:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            for letter in letters:
                await _record_one(conn, letter)

    async def park_behind(self, letters: Sequence[NewDeadLetter]) -> Parking:
        """Record those of ``letters`` whose aggregate is parked for their projection.

        Each is parked behind the first letter of its aggregate, if its version
        is above that letter's. Returns the (partition, offset) of every letter
        parked (recorded now or before), which the caller does not apply, and
        which of the letters' aggregates are parked at all. The park rows are
        read ``FOR SHARE`` in the transaction that records the letters, so a
        replay running on them is waited for (module doc).
        """
        if not letters:
            return Parking(set(), set())
        projections = sorted({d.projection for d in letters} | {ALL_PROJECTIONS})
        aggregates = sorted({d.aggregate_id for d in letters if d.aggregate_id is not None})
        held: set[tuple[int, int]] = set()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            rows = await conn.fetch(
                "SELECT p.projection, p.aggregate_id, p.version, p.first_letter,"
                ' d.topic, d.partition, d."offset" FROM engine_parked p'
                " JOIN engine_dead_letters d ON d.id = p.first_letter"
                " WHERE p.projection = ANY($1) AND p.aggregate_id = ANY($2)"
                " ORDER BY p.version, p.first_letter FOR SHARE OF p",
                projections,
                aggregates,
            )
            for letter in letters:
                head = _head_for(rows, letter)
                if head is not None:
                    await _insert(conn, letter, parked_behind=head)
                    held.add((letter.partition, letter.offset))
        return Parking(held, {r["aggregate_id"] for r in rows})

    async def parked_ids(self, projection: str) -> set[str]:
        """Every aggregate parked for ``projection`` (its own parks and those of ``*``).

        Unlocked: a lane keeps this set and asks :meth:`park_behind` (locked)
        only about the aggregates in it (see :mod:`engine.lane`).
        """
        rows = await self._pool.fetch(
            "SELECT DISTINCT aggregate_id FROM engine_parked WHERE projection = ANY($1)",
            [projection, ALL_PROJECTIONS],
        )
        return {r["aggregate_id"] for r in rows}

    async def parked(self, projection: str | None = None) -> list[Parked]:
        """Parked aggregates (for ``projection``: its own and those of ``*``), oldest first."""
        rows = await self._pool.fetch(
            f"{_PARKED} WHERE $1::text IS NULL OR p.projection = $1 OR p.projection = '*'"
            " ORDER BY p.first_letter",
            projection,
        )
        return [Parked(**dict(r)) for r in rows]

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


async def parked_sequence(conn: Connection, first_id: int) -> list[DeadLetter]:
    """A first letter and the letters parked behind it, not replayed yet, in recording order.

    Each lane records its parked letters in offset order, so recording order
    is the aggregate's order for each projection.
    """
    rows = await conn.fetch(
        f"{_SELECT} WHERE replayed_at IS NULL AND (id = $1 OR parked_behind = $1)"
        " ORDER BY (id <> $1), id",
        first_id,
    )
    letters = [_letter(r) for r in rows]
    return letters if letters and letters[0].id == first_id else []


def _head_for(rows: Sequence[asyncpg.Record], letter: NewDeadLetter) -> int | None:
    """The first letter ``letter`` must wait behind, if any (rows ordered by version)."""
    if letter.aggregate_id is None or letter.aggregate_version is None:
        return None
    message = (letter.topic, letter.partition, letter.offset)
    for row in rows:
        if row["aggregate_id"] != letter.aggregate_id or row["projection"] not in (
            letter.projection,
            ALL_PROJECTIONS,
        ):
            continue
        # Behind the hole, or the first letter's own event delivered again.
        if letter.aggregate_version > row["version"] or message == (
            row["topic"],
            row["partition"],
            row["offset"],
        ):
            return int(row["first_letter"])
    return None


async def _insert(
    conn: Connection, letter: NewDeadLetter, *, parked_behind: int | None = None
) -> int | None:
    """Insert one letter; its id, or None if it was recorded before."""
    value = await conn.fetchval(
        _INSERT,
        letter.projection,
        letter.topic,
        letter.partition,
        letter.offset,
        letter.key,
        letter.value,
        json.dumps(letter.headers),
        letter.event_type,
        letter.error[:4000],
        letter.attempts,
        letter.aggregate_id,
        letter.aggregate_version,
        parked_behind,
    )
    return None if value is None else int(value)


async def _record_one(conn: Connection, letter: NewDeadLetter) -> None:
    if letter.aggregate_id is None or letter.aggregate_version is None:
        await _insert(conn, letter)
        return
    head = await conn.fetchval(
        "SELECT first_letter FROM engine_parked WHERE projection = $1 AND aggregate_id = $2"
        " FOR SHARE",
        letter.projection,
        letter.aggregate_id,
    )
    if head is not None:
        await _insert(conn, letter, parked_behind=head)
        return
    letter_id = await _insert(conn, letter)
    if letter_id is None:  # delivered again: its park (if still there) was made the first time
        return
    await conn.execute(
        "INSERT INTO engine_parked (projection, aggregate_id, version, first_letter, reason)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        letter.projection,
        letter.aggregate_id,
        letter.aggregate_version,
        letter_id,
        letter.error[:1000],
    )
