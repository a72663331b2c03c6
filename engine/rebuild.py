"""Rebuilding a projection from the event log into a new generation, while the daemon runs.

1. **One at a time.** The rebuild takes a session advisory lock for the
   projection on its own connection (named ``engine rebuild <projection>
   (<host> pid <pid>)`` in ``pg_stat_activity``) and keeps it to the end; a
   second rebuild of the same projection is refused with
   :class:`RebuildInProgressError`, naming the holder. Two at once used to
   corrupt the new generation: the second dropped the first's half-filled
   ``g+1`` (and Elasticsearch then auto-created the index with dynamic
   mappings on the next write).
2. **Repair first.** Under the generation fence, the current generation
   (:func:`engine.generations.current_generation`) is taken up: set up, with
   readers pointed at it, which repairs a rebuild that died after its switch
   committed but before it moved the alias or pointer. ``g+1``, which only a
   rebuild that died before its switch can have left, is dropped and created
   empty.
3. **Replay, settled.** The log is replayed into ``g+1`` by position, round
   by round, each round up to a bound below which every position is final
   (committed or aborted: see :mod:`engine.postgres.outbox` for why an xid
   horizon is not such a bound, and how this one is found). Readers and the
   daemon keep using ``g`` meanwhile. If the transactions that may still hold
   a position below the bound do not end within ``settle_timeout_s`` (a
   command stuck mid-transaction), the rebuild logs it and goes on to step 4
   from the last settled bound: still exact, only the lanes of this
   projection wait longer.
4. **Switch.** In one transaction under the projection's exclusive fence (see
   :mod:`engine.generations`), the rest of the log (everything committed after
   the cursor) is replayed, Postgres views are re-pointed and ``g+1`` is
   recorded. The daemon applies nothing to this projection meanwhile; an
   event that commits after this read reaches ``g+1`` through the daemon after
   the switch. The projection's progress on each partition is raised to the
   topic's end offsets, read under the fence before the bound: every record
   below them was published, so committed before the read, so it is at most
   the bound and replayed. That is what lets a lane stranded by retention
   (:mod:`engine.catch_up`, :meth:`engine.runner.ProjectionRunner.check_retention`)
   go on after the rebuild: without it, the group's offset still below the
   log's start would strand the rebuilt projection again at every restart.
   Kafka out of reach skips this (logged): the rebuild still holds.
5. **Point readers, then drop.** After the commit, the alias or pointer key
   moves to ``g+1`` (idempotently, under the shared fence; a crash before it is
   repaired as in step 2, or by a lane taking up ``g+1``), and ``g`` is dropped
   unless kept.

This is also how a Redis that lost its data is refilled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.application import Application
from engine.errors import ConfigurationError, PoisonError, RebuildInProgressError
from engine.generations import at_current_generation, fence_key
from engine.postgres import outbox
from engine.postgres.checkpoints import raise_progress
from engine.postgres.pool import CONNECTION_ERRORS, Connection, unavailable
from engine.projection import Projected, Projection, RebuildableStore
from engine.registry import EventRegistry
from engine.resources import Resources
from engine.settings import KafkaSettings, PostgresSettings
from engine.topics import topic_partitions

log = logging.getLogger("engine.rebuild")

Progress = Callable[[int, int], None]  # (events done, events in total)

# Settled rounds before the switch: each round replays what arrived during the
# previous one, so a few suffice; the cap keeps a write storm from being chased.
_MAX_ROUNDS = 20
_POLL_S = 0.05


@dataclass(frozen=True)
class RebuildReport:
    projection: str
    old_generation: int
    new_generation: int
    replayed: int
    skipped: int


def _find(
    application: Application, resources: Resources, name: str
) -> tuple[Projection, RebuildableStore]:
    pairs = {p.name: (p, s) for p, s in application.projections(resources)}
    if name not in pairs:
        raise ConfigurationError(f"no projection named {name!r}; known: {', '.join(sorted(pairs))}")
    projection, store = pairs[name]
    if not isinstance(store, RebuildableStore):
        raise ConfigurationError(
            f"{name} writes through {type(store).__name__}, which cannot be rebuilt into a new "
            "generation yet"
        )
    return projection, store


async def rebuild(
    application: Application,
    resources: Resources,
    name: str,
    progress: Progress,
    *,
    chunk: int = 2000,
    keep_old: bool = False,
    settle_timeout_s: float = 10.0,
) -> RebuildReport:
    """Rebuild projection ``name`` into a new generation and switch to it (steps above)."""
    projection, store = _find(application, resources, name)
    postgres = resources.settings.postgres
    kafka = resources.settings.kafka
    async with rebuild_lock(postgres, name) as conn, _topic_ends(kafka) as ends:
        async with at_current_generation(postgres, name, store) as current:
            pass  # step 2: set up, readers pointed at it
        types = sorted(projection.handles)
        fresh = store.at_generation(current.generation + 1)
        await fresh.drop()
        await fresh.setup()
        replay = _Replay(
            name,
            fresh,
            registry=application.registry,
            types=types,
            chunk=chunk,
            progress=progress,
            total=await outbox.count_log(conn, types),
        )
        await replay.settle(conn, settle_timeout_s)
        await _switch(conn, name, fresh, replay, ends=ends, topic=kafka.topic)
        log.info("%s: generation %d committed; pointing readers at it", name, fresh.generation)
        async with at_current_generation(postgres, name, fresh):
            pass  # step 5: the alias or pointer follows the committed record
        if not keep_old:
            await current.drop()
    return RebuildReport(name, current.generation, fresh.generation, replay.done, replay.skipped)


async def _switch(
    conn: asyncpg.Connection,
    name: str,
    fresh: RebuildableStore,
    replay: _Replay,
    *,
    ends: Callable[[], Awaitable[dict[int, int]]],
    topic: str,
) -> None:
    """Step 4, on the lock's own connection: if the lock was lost, so is the switch.

    The replay under the fence stops at the last position drawn when the
    fence was granted. Reading whatever is committed at every chunk instead
    would chase the writers for as long as they keep committing, with this
    projection's lanes blocked all along (seen under 32 writers: minutes). An
    event not read here is not needed here: an event the daemon applied to
    the old generation was committed before the fence was granted, so its
    position is at most the bound and it is read (every chunk's statement
    sees it); one committed later is applied by no lane before the switch,
    so the daemon applies it to the new generation afterwards. (Not one
    repeatable-read snapshot for the step: its snapshot would be taken by the
    lock statement *before* the lock is granted, and miss the lane's last
    batch.)
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", fence_key(name))
        published = await ends()  # before the bound: see step 4
        bound = (await outbox.settling_position(conn, in_transaction=True)).position
        await replay.run(conn, up_to=bound)
        await raise_progress(conn, name, topic, published)
        # Readers in Postgres (a view) switch with the record, atomically; the
        # others only once it is committed (step 5).
        if getattr(fresh, "publish_in_transaction", False):
            await fresh.publish(conn)
        await conn.execute(
            "INSERT INTO engine_projection_generations (projection, generation) VALUES ($1, $2)"
            " ON CONFLICT (projection) DO UPDATE SET generation = $2, switched_at = now()",
            name,
            fresh.generation,
        )


@asynccontextmanager
async def _topic_ends(
    kafka: KafkaSettings,
) -> AsyncIterator[Callable[[], Awaitable[dict[int, int]]]]:
    """Reads the topic's end offsets per partition for the switch; none while Kafka is away."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    reachable = True
    try:
        await consumer.start()
    except Exception as exc:
        log.warning("Kafka is out of reach (%s): the rebuild will not record its offsets", exc)
        reachable = False

    async def read() -> dict[int, int]:
        if not reachable:
            return {}
        try:
            async with asyncio.timeout(kafka.request_timeout_s):
                partitions = await topic_partitions(kafka)
                if not partitions:  # nothing was ever published
                    return {}
                tps = [TopicPartition(kafka.topic, p) for p in partitions]
                ends = await consumer.end_offsets(tps)
        except Exception as exc:
            log.warning("could not read the topic's end offsets (%s): not recorded", exc)
            return {}
        return {tp.partition: offset for tp, offset in ends.items()}

    try:
        yield read
    finally:
        await consumer.stop()


def _lock_key(projection: str) -> str:
    return f"engine.rebuild:{projection}"


@asynccontextmanager
async def rebuild_lock(
    postgres: PostgresSettings, projection: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the projection's rebuild lock until the block ends.

    Raises :class:`RebuildInProgressError` naming the holder if another
    session holds it. The lock is a session lock, so a rebuild killed in any
    way releases it when Postgres notices its connection is gone.
    """
    who = f"engine rebuild {projection} ({socket.gethostname()} pid {os.getpid()})"
    try:
        conn = await asyncpg.connect(
            postgres.dsn(), timeout=10, server_settings={"application_name": who[:63]}
        )
    except CONNECTION_ERRORS as exc:
        raise unavailable(postgres) from exc
    try:
        key = _lock_key(projection)
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key):
            raise await _refusal(conn, projection)
        yield conn
    finally:
        try:
            await conn.close(timeout=5)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            conn.terminate()


async def _refusal(conn: Connection, projection: str) -> RebuildInProgressError:
    holder = await conn.fetchrow(
        """
        SELECT a.pid, a.application_name, a.backend_start,
               coalesce(a.client_hostname, host(a.client_addr), 'a local socket') AS host
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::int8 = (hashtextextended($1, 0) >> 32) & 4294967295
          AND l.objid::int8 = hashtextextended($1, 0) & 4294967295
        """,
        _lock_key(projection),
    )
    if holder is None:  # it ended between the two queries
        return RebuildInProgressError(projection, None, "a session that just ended", "", None)
    return RebuildInProgressError(
        projection,
        holder["pid"],
        holder["application_name"] or "(no application_name)",
        holder["host"],
        holder["backend_start"],
    )


class _Replay:
    def __init__(
        self,
        name: str,
        store: RebuildableStore,
        *,
        registry: EventRegistry,
        types: list[str],
        chunk: int,
        progress: Progress,
        total: int,
    ) -> None:
        self._name = name
        self._store = store
        self._registry = registry
        self._types = types
        self._chunk = chunk
        self._progress = progress
        self.total = total
        self.position = 0
        self.done = 0
        self.skipped = 0

    async def settle(self, conn: Connection, timeout_s: float) -> None:
        """Step 3: replay round by round, each up to a settled bound, outside the fence."""
        for _ in range(_MAX_ROUNDS):
            bound = await self._settled_bound(conn, timeout_s)
            if bound is None:
                return
            before = self.done
            await self.run(conn, up_to=bound)
            # Every position up to the bound is final and was read: continue after it.
            self.position = max(self.position, bound)
            if self.done - before < self._chunk:
                return  # little arrived meanwhile: the fenced phase takes the rest

    async def _settled_bound(self, conn: Connection, timeout_s: float) -> int | None:
        """A bound below which the log is final, or None if its writers outlast ``timeout_s``."""
        settling = await outbox.settling_position(conn)
        open_writers = await outbox.still_writing(conn, settling.writers)
        if not open_writers:
            return settling.position
        log.info(
            "%s: waiting for %d transaction(s) that may hold positions up to %d",
            self._name,
            open_writers,
            settling.position,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
            if not await outbox.still_writing(conn, settling.writers):
                return settling.position
        log.warning(
            "%s: transactions writing the event log are still open after %.1fs; replaying "
            "the rest under the fence (the daemon's lane for it waits meanwhile)",
            self._name,
            timeout_s,
        )
        return None

    async def run(self, conn: Connection, *, up_to: int | None) -> None:
        """Replay every committed event after the cursor (up to ``up_to``), in position order."""
        while events := await outbox.read_log(
            conn, self.position, self._chunk, self._types, up_to=up_to
        ):
            items = []
            for envelope in events:
                try:
                    items.append(Projected(envelope, self._registry.decode(envelope)))
                except PoisonError:
                    self.skipped += 1
            await self._store.apply(items)
            self.position = events[-1].position
            self.done += len(events)
            self.total = max(self.total, self.done)
            self._progress(self.done, self.total)
