"""Read-your-writes: consistency tokens and waiting, exactly, for a projection to reach one.

A command's result carries the global position of its last event, and the
token names the Kafka partition that aggregate's events go to
(``partition_for``), so the token is known before anything is published.

Why "the projection's highest position on that partition is at or past the
token's" is *not* exact: positions are drawn at insert and commit out of
order, so the relay can publish, and the daemon apply, position 11 before a
late-committing 10 of another aggregate on the same partition; a gate on
positions would then pass token 10 while 10 is not applied.

What the gate checks instead, per projection: the projection's next offset on
the partition is past the *Kafka offset* of the token's event. The relay
records that offset when Kafka acknowledges the event (``engine_outbox``), and
a lane records its next offset only after every message below it is durably
applied, skipped as not wanted, or dead-lettered; offsets within a partition
are totally ordered, so this comparison has no commit-order hole. An event the
relay has not published yet has no offset, so the gate waits. Published rows
that the relay purged after their retention leave the highest purged offset
of their partition behind (``engine_outbox_purged``), an upper bound of the
event's own offset: still exact, never early. An event published twice (relay
crash between ack and mark) carries its later offset: later is safe.

A dead-lettered write is not applied, so passing it would present a read model
without the write as if it had it: when the projection has an unreplayed dead
letter of the token's aggregate at or below the write's offset (an earlier
event of that aggregate missing counts too), the gate raises
:class:`WriteNotAppliedError` (HTTP 503 ``write_dead_lettered``, no
Retry-After), naming the letter to replay. Waiting could not help.

All of it reads only tables that replicate with the read models, so the check
works against a read replica too: a lagging replica lags in both.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from engine.commands import CommandResult
from engine.errors import NotYetConsistentError, ValidationFailedError, WriteNotAppliedError
from engine.partitioning import partition_for

_TOKEN = re.compile(r"^(\d{1,4})\.(\d{1,19})$")


@dataclass(frozen=True)
class ConsistencyToken:
    """Where a write landed: its Kafka partition and its global position."""

    partition: int
    position: int

    def encode(self) -> str:
        return f"{self.partition}.{self.position}"

    @classmethod
    def parse(cls, text: str, field: str = "consistency_token") -> ConsistencyToken:
        """Read a token a client sent back; a malformed one is the client's error."""
        match = _TOKEN.match(text.strip())
        if match is None:
            raise ValidationFailedError(
                field, "not a consistency token (expected the value a command returned)"
            )
        return cls(partition=int(match[1]), position=int(match[2]))

    @classmethod
    def of(cls, result: CommandResult, partitions: int) -> ConsistencyToken | None:
        """The token of a command's result; None when it recorded no event."""
        if result.position is None:
            return None
        return cls(partition_for(result.aggregate_id, partitions), result.position)


# Per projection asked about: whether its next offset on the event's partition is
# past the event's offset, and the first unreplayed dead letter of the event's
# aggregate (or an undecodable one, '*', with the same key) at or below it.
# No row at all: the event is not in this database (a replica behind), or not
# published yet (its offset is unknown).
_REACHED = """
WITH event AS (
    SELECT e.aggregate_id,
           coalesce(o.kafka_partition, $3) AS partition,
           CASE WHEN o.position IS NULL
                THEN (SELECT max_offset FROM engine_outbox_purged WHERE partition = $3)
                ELSE o.kafka_offset END AS kafka_offset
    FROM engine_event_log e LEFT JOIN engine_outbox o USING (position)
    WHERE e.position = $4
)
SELECT p.projection,
       (SELECT min(d.id) FROM engine_dead_letters d
        WHERE d.projection IN (p.projection, '*') AND d.topic = $2
          AND d.partition = event.partition AND d."offset" <= event.kafka_offset
          AND d.key = convert_to(event.aggregate_id, 'UTF8') AND d.replayed_at IS NULL
       ) AS dead_letter
FROM event JOIN engine_partition_progress p
  ON p.projection = ANY($1::text[]) AND p.topic = $2 AND p.partition = event.partition
 AND p.next_offset > event.kafka_offset
"""


class ConsistencyGate:
    """Waits, bounded, until projections have applied a token's write."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        topic: str,
        timeout_s: float,
        *,
        first_poll_s: float = 0.005,
        max_poll_s: float = 0.1,
    ) -> None:
        self._pool = pool
        self._topic = topic
        self._timeout_s = timeout_s
        self._first_poll_s = first_poll_s
        self._max_poll_s = max_poll_s

    async def reached(self, projections: Sequence[str], token: ConsistencyToken) -> set[str]:
        """The projections among ``projections`` that have applied ``token``'s write.

        Raises :class:`WriteNotAppliedError` for one that moved past it by
        dead-lettering it.
        """
        rows = await self._pool.fetch(
            _REACHED, list(projections), self._topic, token.partition, token.position
        )
        for row in rows:
            if row["dead_letter"] is not None:
                raise WriteNotAppliedError(row["projection"], token.encode(), row["dead_letter"])
        return {row["projection"] for row in rows}

    async def wait(self, projections: Sequence[str], token: ConsistencyToken | None) -> None:
        """Return once every projection applied ``token``'s write; else NotYetConsistentError.

        Polls with a growing interval (a few ms at first, since the usual wait
        is one daemon batch), never longer than the configured timeout.
        """
        if token is None:
            return
        started = time.monotonic()
        deadline = started + self._timeout_s
        pause = self._first_poll_s
        missing = set(projections)
        while True:
            missing -= await self.reached(sorted(missing), token)
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotYetConsistentError(
                    sorted(missing)[0], token.encode(), time.monotonic() - started
                )
            await asyncio.sleep(min(pause, left))
            pause = min(self._max_poll_s, pause * 2)
