"""Read-your-writes: consistency tokens and waiting for a projection to reach one.

A command's result carries the global position of its last event. The relay
sends an aggregate's events to ``partition_for(aggregate_id, partitions)`` in
position order, and the daemon records per projection and partition the
highest position it has processed (``engine_partition_progress``). So "this
projection has applied my write" is exactly: its progress on that partition is
at or past the position. The token carries both numbers, so a reader needs
nothing but the read model to check it, and works against a replica too.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from engine.commands import CommandResult
from engine.errors import NotYetConsistentError, ValidationFailedError
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


class ConsistencyGate:
    """Waits, bounded, until projections have processed a token's write."""

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
        """The projections among ``projections`` that have processed ``token``."""
        rows = await self._pool.fetch(
            "SELECT projection FROM engine_partition_progress"
            " WHERE projection = ANY($1::text[]) AND topic = $2 AND partition = $3"
            " AND position >= $4",
            list(projections),
            self._topic,
            token.partition,
            token.position,
        )
        return {row["projection"] for row in rows}

    async def wait(self, projections: Sequence[str], token: ConsistencyToken | None) -> None:
        """Return once every projection processed ``token``; else NotYetConsistentError.

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
