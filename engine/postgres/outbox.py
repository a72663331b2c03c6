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

Reading the log by position (a rebuild) needs a bound at or below which every
position is *final*: committed (and visible) or aborted, so no lower position
can still appear once the reader has moved past it. ``tx_id`` does not give
one: a command draws its transaction id at its first write (its claim) and its
position later, at append, so xid order is not position order (A claims xid
100, B 101, C 102; C appends position 500 and commits; A appends 501 and
commits; with B open, "xid below the oldest in flight" keeps 501 and hides the
committed 500). Ordering by xid instead would break the per-aggregate order
above. :func:`settling_position` finds the bound instead:

1. read the identity sequence's last value ``S``: every position ``<= S`` was
   drawn before this read;
2. then list the transactions holding ``RowExclusiveLock`` on the log: a
   transaction takes that lock when its ``INSERT`` starts, before the identity
   default draws a position, and keeps it until it ends, so any transaction
   that drew a position ``<= S`` and has not ended yet is on this list;
3. wait until none of them holds the lock any more (:func:`still_writing`).
   Postgres releases a transaction's locks after it has become visible as
   committed (or aborted), so afterwards every position ``<= S`` is final,
   and a read bounded by ``S`` may be followed by one starting after ``S``.

Only transactions writing the log are waited for, so an unrelated long
transaction does not hold a rebuild; one that writes the log and stays open
does, and the caller bounds that wait. ``tx_id`` is still recorded, drawn
before the position (see :func:`append`), for operators correlating rows with
transactions.
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
    # The leader relay's lease, renewed through the connection that holds the
    # leader lock; a standby terminates a holder whose lease went stale (the
    # argument is in engine.relay).
    Migration(
        "engine-0007-relay-lease",
        """
        CREATE TABLE engine_relay_lease (
            lock_key    bigint PRIMARY KEY,
            holder_pid  integer NOT NULL,
            holder_name text NOT NULL,
            renewed_at  timestamptz NOT NULL
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


# One statement appends the events, queues them, records the command's result
# (when there is one) and wakes the relay: one round trip instead of three.
# The result is built here, from the positions just drawn, in the shape of
# engine.commands.CommandResult (which reads it back for a duplicate command).
_APPEND = """
    WITH tx AS MATERIALIZED (
        SELECT pg_current_xact_id() AS id
    ), new AS (
        INSERT INTO engine_event_log (event_id, event_type, schema_version, aggregate_type,
            aggregate_id, aggregate_version, occurred_at, correlation_id, causation_id,
            payload, tx_id)
        SELECT e.*, tx.id FROM tx, unnest($1::uuid[], $2::text[], $3::int[], $4::text[],
            $5::text[], $6::int[], $7::timestamptz[], $8::uuid[], $9::uuid[], $10::jsonb[]) AS e
        RETURNING {returning}
    ), queued AS (
        INSERT INTO engine_outbox (position) SELECT position FROM new
    ), done AS (
        UPDATE engine_commands SET result = jsonb_build_object(
            'command_id', command_id, 'aggregate_id', $12::text, 'version', $13::int,
            'position', (SELECT max(position) FROM new),
            'event_types', (SELECT jsonb_agg(event_type ORDER BY position) FROM new))
        WHERE command_id = $11::uuid
    ), woken AS MATERIALIZED (
        SELECT pg_notify('{channel}', '')
    )
    SELECT {returning} FROM new CROSS JOIN woken ORDER BY position
"""
_APPEND_ENVELOPES = _APPEND.format(returning=_COLUMNS, channel=NOTIFY_CHANNEL)
_APPEND_POSITIONS = _APPEND.format(returning="position, event_type", channel=NOTIFY_CHANNEL)

EventRow = tuple[UUID, str, int, str, str, int, datetime, UUID, UUID, str]


@dataclass(frozen=True)
class Outcome:
    """What the command whose claim row is ``command_id`` did, stored with its events."""

    command_id: UUID
    aggregate_id: str
    version: int


async def append(conn: Connection, events: Sequence[EventRow]) -> list[EventEnvelope]:
    """Append rows (in the caller's transaction) to the log and the outbox; wake the relay.

    Each tuple is (event_id, event_type, schema_version, aggregate_type,
    aggregate_id, aggregate_version, occurred_at, correlation_id, causation_id,
    payload_json). The notification is delivered only if the transaction commits
    (Postgres queues a ``NOTIFY`` until then, whichever statement sends it).

    The transaction id is drawn before any position, even when this is the
    transaction's first write: ``tx`` is a materialized CTE that the source
    rows join, and the identity default (``nextval``) is evaluated when a
    joined row is projected into the insert, which needs ``tx`` first. (The
    command bus claims its id first anyway; this keeps ``tx_id`` honest for
    any other caller.)
    """
    rows = await conn.fetch(_APPEND_ENVELOPES, *_columns(events), None, None, None)
    return [_envelope(row) for row in rows]


async def append_for_command(
    conn: Connection, events: Sequence[EventRow], outcome: Outcome
) -> list[tuple[int, str]]:
    """:func:`append`, and store ``outcome`` as the result of its command, in one statement.

    The command's claim row (``engine_commands``) gets its result built from the
    positions drawn; the (position, event_type) of each event come back in
    position order. Nothing is decoded: the bus needs no envelope.
    """
    if not events:
        raise ValueError("append_for_command needs at least one event")
    rows = await conn.fetch(
        _APPEND_POSITIONS,
        *_columns(events),
        outcome.command_id,
        outcome.aggregate_id,
        outcome.version,
    )
    return [(row[0], row[1]) for row in rows]


def _columns(events: Sequence[EventRow]) -> list[list[Any]]:
    return [list(column) for column in zip(*events, strict=True)]


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
    """What the relay still has to publish, and when it last published (ages by Postgres' clock)."""

    count: int
    oldest_at: datetime | None
    waited_s: float | None = None
    """Seconds since the first unpublished event occurred; None if none waits."""
    last_published_s: float | None = None
    """Seconds since the relay last marked a row published; None if no published row is kept
    (none yet, or all purged after ``retention_hours``)."""
    leader: str | None = None
    """The relay that last held the leader lease (its name), if any ever did."""
    lease_age_s: float | None = None
    """Seconds since that lease was renewed."""


async def pending_backlog(conn: Connection) -> Backlog:
    """Unpublished rows, the time of the lowest position among them, the last publish, the lease.

    The lowest position stands for the oldest, and the newest ``published_at``
    for the last publish: index look-ups all (``engine_outbox_pending``,
    ``engine_outbox_published``), so this stays cheap with a large backlog (an
    exact ``min(occurred_at)`` would join every pending row).
    """
    row = await conn.fetchrow(
        """
        WITH oldest AS (
            SELECT e.occurred_at FROM engine_event_log e WHERE e.position =
                (SELECT min(position) FROM engine_outbox WHERE published_at IS NULL)
        ), lease AS (
            SELECT holder_name, renewed_at FROM engine_relay_lease
            ORDER BY renewed_at DESC LIMIT 1
        )
        SELECT (SELECT count(*) FROM engine_outbox WHERE published_at IS NULL) AS count,
            (SELECT occurred_at FROM oldest) AS oldest_at,
            extract(epoch FROM now() - (SELECT occurred_at FROM oldest)) AS waited_s,
            extract(epoch FROM now() - (SELECT max(published_at) FROM engine_outbox
                WHERE published_at IS NOT NULL)) AS last_published_s,
            (SELECT holder_name FROM lease) AS leader,
            extract(epoch FROM now() - (SELECT renewed_at FROM lease)) AS lease_age_s
        """
    )
    assert row is not None  # a SELECT without FROM always returns one row
    return Backlog(
        count=int(row["count"]),
        oldest_at=row["oldest_at"],
        waited_s=_seconds(row["waited_s"]),
        last_published_s=_seconds(row["last_published_s"]),
        leader=row["leader"],
        lease_age_s=_seconds(row["lease_age_s"]),
    )


def _seconds(value: object) -> float | None:
    # extract(epoch ...) is numeric: a Decimal to asyncpg.
    return None if value is None else max(0.0, float(str(value)))


async def read_log(
    conn: Connection,
    after_position: int,
    limit: int,
    event_types: Sequence[str],
    *,
    up_to: int | None = None,
    below_horizon: bool = False,
) -> list[EventEnvelope]:
    """Committed events of these types after ``after_position``, in position order.

    With ``up_to`` a position from :func:`settling_position` (once settled),
    the next call may safely continue after the last position returned, and
    after ``up_to`` once nothing is left below it. Without it, an event with a
    lower position may still commit later. (``below_horizon`` is gone: the xid
    horizon it used skips committed events, see the module docstring.)
    """
    if below_horizon:
        raise ValueError("read_log(below_horizon=True) is unsound; bound it with up_to")
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM engine_event_log
        WHERE position > $1 AND event_type = ANY($3::text[]) AND position <= $4
        ORDER BY position LIMIT $2
        """,
        after_position,
        limit,
        list(event_types),
        up_to if up_to is not None else 2**63 - 1,
    )
    return [_envelope(row) for row in rows]


@dataclass(frozen=True)
class Settling:
    """A bound of the log and the transactions that may still hold a position below it."""

    position: int
    writers: list[str]  # virtual transaction ids


async def settling_position(conn: Connection, *, in_transaction: bool = False) -> Settling:
    """Step 1 and 2 of the module docstring's argument: the bound, then its writers.

    Two statements, in this order, outside a transaction (so that the second
    sees what the first could not): the writers must be listed after the bound
    is read. ``in_transaction`` is for a caller that only needs the bound.
    """
    if conn.is_in_transaction() and not in_transaction:
        raise RuntimeError("settling_position needs a connection outside a transaction")
    drawn = await conn.fetchval(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence('engine_event_log', 'position'))"
    )
    writers = await conn.fetchval(
        "SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks"
        " WHERE locktype = 'relation' AND relation = 'engine_event_log'::regclass"
        " AND mode = 'RowExclusiveLock' AND granted AND pid IS DISTINCT FROM pg_backend_pid()"
    )
    return Settling(int(drawn or 0), list(writers))


async def still_writing(conn: Connection, writers: Sequence[str]) -> int:
    """How many of ``writers`` have not ended yet (step 3: wait until none)."""
    if not writers:
        return 0
    count = await conn.fetchval(
        "SELECT count(DISTINCT virtualtransaction) FROM pg_locks"
        " WHERE locktype = 'relation' AND relation = 'engine_event_log'::regclass"
        " AND mode = 'RowExclusiveLock' AND virtualtransaction = ANY($1::text[])",
        list(writers),
    )
    return int(count)


async def count_log(conn: Connection, event_types: Sequence[str]) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM engine_event_log WHERE event_type = ANY($1::text[])",
        list(event_types),
    )
    return int(value)
