"""Generations of a projection's store, and the fence that makes switching them safe.

A rebuild fills generation ``g+1`` of a projection (a new table, index or key
prefix) from the event log while the daemon keeps writing generation ``g``,
then switches readers and writers to ``g+1``. The switch must not lose an
event that the daemon applied to ``g`` after the rebuild's last read of the
log, so it happens under a fence:

- each lane applies a batch while holding a *shared* advisory lock for its
  projection, and reads the current generation under it;
- the rebuild takes the *exclusive* lock (waiting for the batch in flight),
  replays every committed event it has not replayed yet, switches the
  generation and the readers in one step, and releases.

Any event a lane applied before the switch is committed in the log, so the
final replay covers it; any batch after the switch goes to the new generation,
whose per-aggregate versions make the overlap harmless.

If the fence's own connection to Postgres is down, a lane keeps writing the
generation it last saw instead of stopping: a rebuild cannot switch while
Postgres is unreachable, except in a partial network partition (the rebuild
reaches Postgres, the daemon does not), which this does not cover.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from engine.postgres.migrations import Migration
from engine.postgres.pool import CONNECTION_ERRORS, Connection
from engine.settings import PostgresSettings

log = logging.getLogger("engine.generations")

GENERATION_MIGRATIONS = (
    Migration(
        "engine-0004-projection-generations",
        """
        CREATE TABLE engine_projection_generations (
            projection text PRIMARY KEY,
            generation integer NOT NULL CHECK (generation > 0),
            switched_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)


def fence_key(projection: str) -> str:
    return f"engine.projection:{projection}"


async def current_generation(conn: Connection, projection: str) -> int:
    value = await conn.fetchval(
        "SELECT generation FROM engine_projection_generations WHERE projection = $1", projection
    )
    return int(value) if value is not None else 1


class GenerationFence:
    """A lane's side of the fence: a dedicated connection for the shared lock."""

    def __init__(self, postgres: PostgresSettings, projection: str) -> None:
        self._postgres = postgres
        self._projection = projection
        self._conn: asyncpg.Connection | None = None
        self.generation = 1

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[int]:
        """Hold the shared lock around one apply; yields the current generation."""
        key = fence_key(self._projection)
        try:
            conn = await self._connection()
            await conn.execute("SELECT pg_advisory_lock_shared(hashtextextended($1, 0))", key)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning(
                "%s: fence unavailable (%s); writing generation %d",
                self._projection,
                exc,
                self.generation,
            )
            await self.close()
            yield self.generation
            return
        try:
            self.generation = await current_generation(conn, self._projection)
            yield self.generation
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock_shared(hashtextextended($1, 0))", key)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError):
                await self.close()  # the session lock ends with the connection

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._postgres.dsn(), timeout=5)
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=2)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError):
                conn.terminate()
