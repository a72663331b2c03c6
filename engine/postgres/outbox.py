"""The event log and the transactional outbox.

Every event is appended to ``engine_event_log`` (the permanent history that
rebuilds replay) and queued in ``engine_outbox`` (what the relay still has to
publish) in the transaction of the command that caused it, so an event exists
if and only if the command's changes do.

Why the relay does not follow a "position greater than the last one" cursor:
``position`` comes from an identity sequence, assigned when a row is inserted,
not when its transaction commits. A slow transaction can hold position 10
while position 11 commits and is read; a cursor past 11 would never see 10.
The outbox avoids that trap by construction: the relay reads *unpublished rows*
(whatever their position) and marks them published only after Kafka
acknowledged them, so a late commit is simply picked up by the next read.

Why publishing in position order keeps each aggregate in version order: two
events of one aggregate cannot commit out of order. ``(aggregate_type,
aggregate_id, aggregate_version)`` is unique, so a second writer of the same
version blocks on the first and then fails; a writer of the next version can
only read the aggregate, and so insert, after the previous version committed,
and its position is drawn later. Hence for one aggregate, version order,
position order and visibility order agree.

``tx_id`` (``pg_current_xact_id()``) is kept on every row so a reader of the
log by position (a rebuild) can stop at a horizon below every transaction still
in flight (``pg_snapshot_xmin``), where no earlier position can still appear.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from engine.events import EventEnvelope
from engine.postgres.migrations import Migration
from engine.postgres.pool import Connection

NOTIFY_CHANNEL = "engine_outbox"

OUTBOX_MIGRATIONS = (
    Migration(
        "engine-0001-event-log-outbox-commands",
        """
        CREATE TABLE engine_event_log (
            position          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id          uuid NOT NULL UNIQUE,
            event_type        text NOT NULL,
            schema_version    integer NOT NULL CHECK (schema_version > 0),
            aggregate_type    text NOT NULL,
            aggregate_id      text NOT NULL,
            aggregate_version integer NOT NULL CHECK (aggregate_version > 0),
            occurred_at       timestamptz NOT NULL,
            correlation_id    uuid NOT NULL,
            causation_id      uuid NOT NULL,
            payload           jsonb NOT NULL,
            tx_id             xid8 NOT NULL DEFAULT pg_current_xact_id(),
            UNIQUE (aggregate_type, aggregate_id, aggregate_version)
        );
        CREATE TABLE engine_outbox (
            position     bigint PRIMARY KEY REFERENCES engine_event_log (position),
            published_at timestamptz
        );
        CREATE INDEX engine_outbox_pending ON engine_outbox (position)
            WHERE published_at IS NULL;
        CREATE INDEX engine_outbox_published ON engine_outbox (published_at)
            WHERE published_at IS NOT NULL;
        CREATE TABLE engine_commands (
            command_id   uuid PRIMARY KEY,
            command_type text NOT NULL,
            payload_hash text NOT NULL,
            result       jsonb NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    # Where each event landed in Kafka, recorded by the relay with the ack: the
    # consistency gate compares it with a projection's next offset, which is
    # exact whatever order positions committed in (see engine.consistency).
    # When published rows are purged, the highest offset purged per partition
    # is kept, so a token older than the retention is still checked exactly.
    Migration(
        "engine-0006-outbox-offsets",
        """
        ALTER TABLE engine_outbox
            ADD COLUMN kafka_partition integer,
            ADD COLUMN kafka_offset bigint;
        CREATE TABLE engine_outbox_purged (
            partition  integer PRIMARY KEY,
            max_offset bigint NOT NULL
        );
        """,
    ),
)

_COLUMNS = (
    "position, event_id, event_type, schema_version, aggregate_type, aggregate_id,"
    " aggregate_version, occurred_at, correlation_id, causation_id, payload"
)


def _envelope(row: asyncpg.Record) -> EventEnvelope:
    payload: Any = row["payload"]
    return EventEnvelope(
        position=row["position"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        aggregate_version=row["aggregate_version"],
        occurred_at=row["occurred_at"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        payload=json.loads(payload) if isinstance(payload, str) else payload,
    )


async def append(
    conn: Connection,
    events: Sequence[tuple[UUID, str, int, str, str, int, datetime, UUID, UUID, str]],
) -> list[EventEnvelope]:
    """Append rows (in the caller's transaction) to the log and the outbox; wake the relay.

    Each tuple is (event_id, event_type, schema_version, aggregate_type,
    aggregate_id, aggregate_version, occurred_at, correlation_id, causation_id,
    payload_json). The notification is delivered only if the transaction commits.
    """
    rows = await conn.fetch(
        f"""
        WITH new AS (
            INSERT INTO engine_event_log (event_id, event_type, schema_version, aggregate_type,
                aggregate_id, aggregate_version, occurred_at, correlation_id, causation_id,
                payload)
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[],
                $6::int[], $7::timestamptz[], $8::uuid[], $9::uuid[], $10::jsonb[])
            RETURNING {_COLUMNS}
        ), queued AS (
            INSERT INTO engine_outbox (position) SELECT position FROM new
        )
        SELECT {_COLUMNS} FROM new ORDER BY position
        """,
        *(list(column) for column in zip(*events, strict=True)),
    )
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return [_envelope(row) for row in rows]


async def fetch_pending(conn: Connection, limit: int) -> list[EventEnvelope]:
    """Committed, unpublished events in position order."""
    rows = await conn.fetch(
        f"""
        SELECT {", ".join("e." + c.strip() for c in _COLUMNS.split(","))}
        FROM engine_outbox o JOIN engine_event_log e USING (position)
        WHERE o.published_at IS NULL
        ORDER BY o.position
        LIMIT $1
        """,
        limit,
    )
    return [_envelope(row) for row in rows]


@dataclass(frozen=True)
class Published:
    """Kafka acknowledged event ``position`` at ``offset`` of ``partition``."""

    position: int
    partition: int
    offset: int


async def mark_published(conn: Connection, published: Sequence[Published]) -> None:
    """Mark rows published, recording where each landed (the consistency gate reads it)."""
    await conn.execute(
        """
        UPDATE engine_outbox o SET published_at = now(), kafka_partition = p.partition,
            kafka_offset = p.kafka_offset
        FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS p(position, partition, kafka_offset)
        WHERE o.position = p.position
        """,
        [p.position for p in published],
        [p.partition for p in published],
        [p.offset for p in published],
    )


async def purge_published(conn: Connection, retention_hours: float) -> int:
    """Delete outbox rows published longer ago than the retention; the log keeps the events.

    The highest offset deleted per partition is kept in ``engine_outbox_purged``:
    a consistency token of a purged event is checked against it, which is
    exact (that event's offset is at or below it) and at worst waits for a
    few later events of the same partition.
    """
    count = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM engine_outbox
            WHERE published_at < now() - make_interval(secs => $1)
            RETURNING kafka_partition, kafka_offset
        ), kept AS (
            INSERT INTO engine_outbox_purged (partition, max_offset)
            SELECT kafka_partition, max(kafka_offset) FROM gone
            WHERE kafka_partition IS NOT NULL GROUP BY kafka_partition
            ON CONFLICT (partition) DO UPDATE
                SET max_offset = GREATEST(engine_outbox_purged.max_offset, EXCLUDED.max_offset)
        )
        SELECT count(*) FROM gone
        """,
        retention_hours * 3600.0,
    )
    return int(count)


async def pending_count(conn: Connection) -> int:
    count = await conn.fetchval("SELECT count(*) FROM engine_outbox WHERE published_at IS NULL")
    return int(count)


@dataclass(frozen=True)
class Backlog:
    """What the relay still has to publish: how many rows, and when the first one occurred."""

    count: int
    oldest_at: datetime | None


async def pending_backlog(conn: Connection) -> Backlog:
    """Unpublished rows and the time of the lowest position among them.

    The lowest position stands for the oldest: both index look-ups, so this
    stays cheap with a large backlog (an exact ``min(occurred_at)`` would join
    every pending row).
    """
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM engine_outbox WHERE published_at IS NULL) AS count,"
        " (SELECT e.occurred_at FROM engine_event_log e WHERE e.position ="
        " (SELECT min(position) FROM engine_outbox WHERE published_at IS NULL)) AS oldest_at"
    )
    assert row is not None  # a SELECT without FROM always returns one row
    return Backlog(count=int(row["count"]), oldest_at=row["oldest_at"])


async def read_log(
    conn: Connection,
    after_position: int,
    limit: int,
    event_types: Sequence[str],
    *,
    below_horizon: bool = True,
) -> list[EventEnvelope]:
    """Events of these types after ``after_position``, in position order.

    With ``below_horizon`` (the default), only events below every transaction
    still in flight: no event with a lower position can commit later, so the
    next call may safely continue after the last position returned.
    """
    horizon = "AND tx_id < pg_snapshot_xmin(pg_current_snapshot())" if below_horizon else ""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM engine_event_log
        WHERE position > $1 AND event_type = ANY($3::text[]) {horizon}
        ORDER BY position LIMIT $2
        """,
        after_position,
        limit,
        list(event_types),
    )
    return [_envelope(row) for row in rows]


async def count_log(conn: Connection, event_types: Sequence[str]) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM engine_event_log WHERE event_type = ANY($1::text[])",
        list(event_types),
    )
    return int(value)
