"""Rebuilding a projection from the event log into a new generation, while the daemon runs.

1. The new generation (table, index or key prefix) is created empty.
2. The event log is replayed into it by position, in chunks, always below the
   horizon of transactions in flight (so no event is skipped by a late commit).
   Readers and the daemon keep using the old generation meanwhile.
3. Under the projection's exclusive fence (see :mod:`engine.generations`), the
   rest of the log (everything committed) is replayed, readers are switched
   (view, alias or pointer key) and the generation is recorded, in one step.
   The daemon's next batch for this projection goes to the new generation.
4. The old generation is dropped (unless kept).

This is also how a Redis that lost its data is refilled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.application import Application
from engine.errors import ConfigurationError, PoisonError
from engine.generations import current_generation, fence_key
from engine.postgres import outbox
from engine.postgres.pool import Connection
from engine.projection import Projected, Projection, RebuildableStore
from engine.registry import EventRegistry
from engine.resources import Resources

Progress = Callable[[int, int], None]  # (events done, events in total)


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
) -> RebuildReport:
    projection, store = _find(application, resources, name)
    types = sorted(projection.handles)
    pool = resources.pool
    async with pool.acquire() as conn:
        old = await current_generation(conn, name)
        total = await outbox.count_log(conn, types)
    fresh = store.at_generation(old + 1)
    await fresh.drop()  # left by a rebuild that died half-way: start clean
    await fresh.setup()
    replay = _Replay(
        fresh,
        registry=application.registry,
        types=types,
        chunk=chunk,
        progress=progress,
        total=total,
    )
    async with pool.acquire() as conn:
        await replay.run(conn, below_horizon=True)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", fence_key(name))
        await replay.run(conn, below_horizon=False)
        await fresh.publish(conn)
        await conn.execute(
            "INSERT INTO engine_projection_generations (projection, generation) VALUES ($1, $2)"
            " ON CONFLICT (projection) DO UPDATE SET generation = $2, switched_at = now()",
            name,
            fresh.generation,
        )
    if not keep_old:
        await store.at_generation(old).drop()
    return RebuildReport(name, old, fresh.generation, replay.done, replay.skipped)


class _Replay:
    def __init__(
        self,
        store: RebuildableStore,
        *,
        registry: EventRegistry,
        types: list[str],
        chunk: int,
        progress: Progress,
        total: int,
    ) -> None:
        self._store = store
        self._registry = registry
        self._types = types
        self._chunk = chunk
        self._progress = progress
        self.total = total
        self.position = 0
        self.done = 0
        self.skipped = 0

    async def run(self, conn: Connection, *, below_horizon: bool) -> None:
        while events := await outbox.read_log(
            conn, self.position, self._chunk, self._types, below_horizon=below_horizon
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
