"""Per-projection checkpoints for operators: how far each projection got, and its last error.

These rows are informational (``engine status``, lag): the progress that makes
application idempotent lives with each store's effect, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class Checkpoint:
    projection: str
    last_position: int
    last_event_at: datetime | None
    applied: int
    last_error: str | None
    last_error_at: datetime | None
    updated_at: datetime


class CheckpointStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def advance(
        self, projection: str, position: int, event_at: datetime | None, applied: int
    ) -> None:
        await self._pool.execute(
            "INSERT INTO engine_projection_checkpoints (projection, last_position, last_event_at,"
            " applied, updated_at) VALUES ($1, $2, $3, $4, now())"
            " ON CONFLICT (projection) DO UPDATE SET"
            " last_position = GREATEST(engine_projection_checkpoints.last_position, $2),"
            " last_event_at = GREATEST(engine_projection_checkpoints.last_event_at, $3),"
            " applied = engine_projection_checkpoints.applied + $4, updated_at = now()",
            projection,
            position,
            event_at,
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

    async def all(self) -> list[Checkpoint]:
        rows = await self._pool.fetch(
            "SELECT projection, last_position, last_event_at, applied, last_error, last_error_at,"
            " updated_at FROM engine_projection_checkpoints ORDER BY projection"
        )
        return [Checkpoint(**dict(r)) for r in rows]
