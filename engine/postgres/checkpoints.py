"""Per-projection checkpoints: how far each projection got on each partition, and its last error.

Two tables, written together after every batch a lane finishes:

- ``engine_projection_checkpoints``: one row per projection (events applied,
  last error) for operators (``engine status``);
- ``engine_partition_progress``: per projection and partition, the next Kafka
  offset (every message below it is applied, not wanted, or dead-lettered)
  and the highest global position processed. Consistency tokens compare the
  next offset with the offset Kafka gave the token's event (the position is
  not exact there: positions commit out of order, see
  :mod:`engine.consistency`); ``engine status`` computes lag from the offsets.

An error stays recorded after the projection recovers (operators want to see
what went wrong), so whether it is still *current* is told by time: it is
current unless something succeeded after it. A finished batch moves
``updated_at``; a finished set-up, which finishes no batch, is recorded as
``recovered_at`` (:meth:`CheckpointStore.recovered`). Without the latter, an
error a daemon hit while setting up (another daemon racing it, a store still
starting) would look current until the next event arrived, maybe hours later.

Neither makes application idempotent (that lives with each store's effect),
so writing them is best effort: a lost row only delays a reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from engine.postgres.migrations import Migration

PROGRESS_MIGRATIONS = (
    Migration(
        "engine-0005-partition-progress",
        """
        CREATE TABLE engine_partition_progress (
            projection   text NOT NULL,
            topic        text NOT NULL,
            partition    integer NOT NULL,
            next_offset  bigint NOT NULL,
            position     bigint NOT NULL,
            event_at     timestamptz,
            updated_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (projection, topic, partition)
        );
        """,
    ),
    Migration(
        "engine-0008-checkpoint-recovery",
        """
        ALTER TABLE engine_projection_checkpoints ADD COLUMN recovered_at timestamptz;
        """,
    ),
)


@dataclass(frozen=True)
class Checkpoint:
    projection: str
    last_position: int
    last_event_at: datetime | None
    applied: int
    last_error: str | None
    last_error_at: datetime | None
    updated_at: datetime
    recovered_at: datetime | None = None
    """When something other than a batch (a set-up) last succeeded after an error."""

    @property
    def error_current(self) -> bool:
        """The last error is the latest news: no batch or set-up succeeded after it."""
        if self.last_error_at is None:
            return False
        # >=: failed() on a new row sets both to the same now(), and no batch finished.
        after_batches = self.last_error_at >= self.updated_at
        return after_batches and (
            self.recovered_at is None or self.last_error_at > self.recovered_at
        )


@dataclass(frozen=True)
class PartitionProgress:
    """How far one projection got on one partition."""

    topic: str
    partition: int
    next_offset: int
    position: int
    event_at: datetime | None


_ADVANCE = """
WITH progress AS (
    INSERT INTO engine_partition_progress
        (projection, topic, partition, next_offset, position, event_at)
    SELECT $1, p.topic, p.partition, p.next_offset, p.position, p.event_at
    FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::timestamptz[])
        AS p(topic, partition, next_offset, position, event_at)
    ON CONFLICT (projection, topic, partition) DO UPDATE SET
        next_offset = GREATEST(engine_partition_progress.next_offset, EXCLUDED.next_offset),
        position = GREATEST(engine_partition_progress.position, EXCLUDED.position),
        event_at = GREATEST(engine_partition_progress.event_at, EXCLUDED.event_at),
        updated_at = now()
)
INSERT INTO engine_projection_checkpoints
    (projection, last_position, last_event_at, applied, updated_at)
VALUES ($1, $7, $8, $9, now())
ON CONFLICT (projection) DO UPDATE SET
    last_position = GREATEST(engine_projection_checkpoints.last_position, $7),
    last_event_at = GREATEST(engine_projection_checkpoints.last_event_at, $8),
    applied = engine_projection_checkpoints.applied + $9,
    updated_at = now()
"""


_RAISE = """
INSERT INTO engine_partition_progress (projection, topic, partition, next_offset, position)
SELECT $1, $2, p.partition, p.next_offset, 0
FROM unnest($3::int[], $4::bigint[]) AS p(partition, next_offset)
ON CONFLICT (projection, topic, partition) DO UPDATE SET
    next_offset = GREATEST(engine_partition_progress.next_offset, EXCLUDED.next_offset),
    updated_at = now()
"""


async def raise_progress(
    conn: asyncpg.Connection, projection: str, topic: str, next_offsets: dict[int, int]
) -> None:
    """Raise the projection's next offsets to at least these (a rebuild's switch, in its
    transaction: everything below them is in the new generation)."""
    if next_offsets:
        partitions = sorted(next_offsets)
        await conn.execute(
            _RAISE, projection, topic, partitions, [next_offsets[p] for p in partitions]
        )


class CheckpointStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def advance(
        self, projection: str, partitions: Sequence[PartitionProgress], applied: int
    ) -> None:
        """Record a finished batch: its progress per partition and the events it applied."""
        if not partitions:
            return
        last = max(partitions, key=lambda p: p.position)
        await self._pool.execute(
            _ADVANCE,
            projection,
            [p.topic for p in partitions],
            [p.partition for p in partitions],
            [p.next_offset for p in partitions],
            [p.position for p in partitions],
            [p.event_at for p in partitions],
            last.position,
            last.event_at,
            applied,
        )

    async def failed(self, projection: str, error: str) -> None:
        await self._pool.execute(
            "INSERT INTO engine_projection_checkpoints (projection, last_error, last_error_at)"
            " VALUES ($1, $2, now()) ON CONFLICT (projection) DO UPDATE SET"
            " last_error = $2, last_error_at = now()",
            projection,
            error[:2000],
        )

    async def recovered(self, projection: str) -> None:
        """Record that the projection works again (its store is set up) after an error.

        A no-op without an error to recover from. Batches need no call: the
        ``updated_at`` of :meth:`advance` tells the same.
        """
        await self._pool.execute(
            "UPDATE engine_projection_checkpoints SET recovered_at = now()"
            " WHERE projection = $1 AND last_error_at IS NOT NULL",
            projection,
        )

    async def all(self) -> list[Checkpoint]:
        rows = await self._pool.fetch(
            "SELECT projection, last_position, last_event_at, applied, last_error, last_error_at,"
            " updated_at, recovered_at FROM engine_projection_checkpoints ORDER BY projection"
        )
        return [Checkpoint(**dict(r)) for r in rows]

    async def progress(self, projection: str, topic: str) -> list[PartitionProgress]:
        rows = await self._pool.fetch(
            "SELECT topic, partition, next_offset, position, event_at"
            " FROM engine_partition_progress WHERE projection = $1 AND topic = $2"
            " ORDER BY partition",
            projection,
            topic,
        )
        return [PartitionProgress(**dict(r)) for r in rows]
