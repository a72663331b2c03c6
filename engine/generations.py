"""Generations of a projection's store: which one is current, and the fence that switches them.

A rebuild fills generation ``g+1`` of a projection (a new table, index or key
prefix) from the event log while the daemon keeps writing generation ``g``,
then switches readers and writers to ``g+1``.

**One place says which generation is current**: the projection's row in
``engine_projection_generations`` (none: generation 1), read by
:func:`current_generation`. Lanes, ``engine dlq replay``, ``engine status``
and ``engine rebuild`` all ask it; none keeps its own idea of the answer for
longer than one fenced write.

**The fence.** The switch must not lose an event that a writer applied to
``g`` after the rebuild's last read of the log, so writers and the switch
exclude each other:

- a writer (a lane's batch, a dead-letter replay) holds a *shared* advisory
  lock for its projection while it writes, and reads the current generation
  under it (:meth:`GenerationFence.hold`);
- the rebuild takes the *exclusive* lock in its switch transaction (waiting
  for the writes in flight), replays every committed event it has not replayed
  yet, records ``g+1`` and commits, which releases the lock.

Any event a writer applied to ``g`` was committed in the log before the switch
took the lock, so the final replay covers it; any write after the commit reads
``g+1``, whose per-aggregate versions make the overlap harmless.

**The fence fails closed.** A writer that cannot take the lock (Postgres
unreachable, or the role's ``lock_timeout``/``statement_timeout`` firing,
which happens exactly while a rebuild holds the exclusive lock) must not
write: it gets a :class:`TransientError` and retries with its backoff. It
never falls back to a generation it remembers: that is how a lane used to
write a generation the switch had just retired (and, starting at 1, one a
rebuild had already dropped).

One exception, which keeps the argument: while Postgres cannot be reached at
all, a lane whose own store still answers writes the generation it last took
up *unconfirmed* (:mod:`engine.lane`). A switch may then retire that
generation without the lane's writes being covered, so nothing is claimed for
them (no progress recorded, no Kafka commit past them) until the lane holds
the fence again; if the generation changed meanwhile, it applies them again to
the new one before anything else, so every event after the switch's bound
still reaches the new generation. A lane that cannot take the lock because a
rebuild holds it (a timeout, not an unreachable server) still just waits.

**Readers' pointers.** Postgres readers use a view, which the switch
transaction re-points, so it moves atomically with the record. Elasticsearch
readers use an alias and Redis readers a pointer key; neither can join a
Postgres transaction, so they move only *after* the commit: moved before it, a
crash in between would leave readers on a generation that no writer fills.
Moved after it, a crash in between leaves them one generation behind, which
:func:`take_up` repairs: whoever next uses the current generation under the
fence (a lane at start or on switching, a dead-letter replay, the next
rebuild) sets it up and points readers at it. Pointing is idempotent, and it
happens under the shared fence after reading the record, so no one can point
readers at a generation that a switch has already replaced.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from engine.errors import TransientError
from engine.postgres.migrations import Migration
from engine.postgres.pool import CONNECTION_ERRORS, Connection, unavailable
from engine.projection import RebuildableStore
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
    """The projection's current generation: the one answer every caller uses."""
    value = await conn.fetchval(
        "SELECT generation FROM engine_projection_generations WHERE projection = $1", projection
    )
    return int(value) if value is not None else 1


@dataclass(frozen=True)
class Fenced:
    """Inside the shared fence: the current generation, and the connection holding the lock."""

    generation: int
    conn: asyncpg.Connection


class GenerationFence:
    """A writer's side of the fence: a dedicated connection for the shared lock."""

    def __init__(self, postgres: PostgresSettings, projection: str) -> None:
        self._postgres = postgres
        self._projection = projection
        self._conn: asyncpg.Connection | None = None

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[Fenced]:
        """Hold the shared lock around one write; yields the current generation.

        Raises :class:`TransientError` (:class:`ServiceUnavailableError` when
        Postgres cannot be reached) instead of yielding without the lock.
        """
        key = fence_key(self._projection)
        try:
            conn = await self._connection()
            await conn.execute("SELECT pg_advisory_lock_shared(hashtextextended($1, 0))", key)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise await self._failed(exc) from exc
        try:
            try:
                generation = await current_generation(conn, self._projection)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                raise await self._failed(exc) from exc
            yield Fenced(generation, conn)
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock_shared(hashtextextended($1, 0))", key)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError):
                await self.close()  # the session lock ends with the connection

    async def _failed(self, exc: BaseException) -> TransientError:
        if isinstance(exc, CONNECTION_ERRORS):
            await self.close()
            return unavailable(self._postgres)
        return TransientError(f"{self._projection}: cannot take the generation fence: {exc}")

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


async def take_up(store: RebuildableStore, fenced: Fenced) -> RebuildableStore:
    """``store`` at the fenced (current) generation, set up, with readers pointed at it.

    Idempotent; this is also the repair of readers' pointers that a crash left
    behind (see the module docstring). A failure here is never an event's
    fault, so whatever it is, it is reported as transient: retried, never
    dead-lettered.
    """
    live = (
        store if store.generation == fenced.generation else store.at_generation(fenced.generation)
    )
    try:
        await live.setup()
        await live.publish(fenced.conn)
    except TransientError:
        raise
    except Exception as exc:
        raise TransientError(
            f"cannot take up generation {fenced.generation}: {type(exc).__name__}: {exc}"
        ) from exc
    return live


@asynccontextmanager
async def at_current_generation(
    postgres: PostgresSettings, projection: str, store: RebuildableStore
) -> AsyncIterator[RebuildableStore]:
    """For a one-off writer: hold the fence and yield ``store`` at the current generation."""
    fence = GenerationFence(postgres, projection)
    try:
        async with fence.hold() as fenced:
            yield await take_up(store, fenced)
    finally:
        await fence.close()
