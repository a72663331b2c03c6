"""The naive baseline: a simple hand-written consumer, one write per event per store.

It reads the same topic and, for every event, awaits one write per
projection that wants it: an ``INSERT ... ON CONFLICT DO UPDATE`` of the
fields the event sets (Postgres views; the statistics projection's own SQL for
that one event), an ``HSET`` (Redis), an ``update`` with ``doc_as_upsert``
(Elasticsearch). No batching, no version checks: what a first consumer looks
like before anyone optimizes it.

It is slow, so it runs on a slice of the stream: ``events`` messages from the
middle of every partition, where the mix of event types is the steady one
(the stream's opening registrations, which no projection handles, are not in
it). To compare with the engine's rate over the whole stream, its cost per
handled event is applied to the stream's handled events only, counting the
registrations as free for the baseline: if anything, that flatters it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.stats import rate
from bench.targets import (
    Targets,
    create_targets,
    next_records,
    stats_tables,
    targets_for,
    topic_reader,
)
from engine import DocumentProjection, Projected, Resources
from engine.codec import decode
from engine.postgres.pool import Connection
from engine.stores.redis import to_field
from projections.orders import APP
from projections.orders.views import (
    CustomerOrders,
    OrderDetails,
    OrderQuickLookup,
    OrderSearch,
    OrderStats,
)

Write = Callable[[Projected], Awaitable[None]]


class NaiveConsumer:
    """One awaited write per event and projection, in consumption order."""

    def __init__(self, resources: Resources, conn: Connection, targets: Targets) -> None:
        self._resources = resources
        self._conn = conn
        self._targets = targets
        self._sql: dict[tuple[str, frozenset[str]], str] = {}
        self._stats = OrderStats()
        details, listing, quick, search = (
            OrderDetails(),
            CustomerOrders(),
            OrderQuickLookup(),
            OrderSearch(),
        )
        self.writes: list[tuple[str, DocumentProjection | OrderStats, Write]] = [
            ("postgres", details, self._postgres(details, targets.details)),
            ("postgres", listing, self._postgres(listing, targets.listing)),
            ("postgres", self._stats, self._statistics),
            ("redis", quick, self._redis(quick)),
            ("elasticsearch", search, self._elasticsearch(search)),
        ]
        self.seconds: dict[str, float] = {"decode": 0.0, "postgres": 0.0, "redis": 0.0}
        self.seconds["elasticsearch"] = 0.0
        self.handled = 0

    async def handle(self, value: bytes | None) -> None:
        started = time.perf_counter()
        envelope = decode(value)
        item = Projected(envelope, APP.registry.decode(envelope))
        self.seconds["decode"] += time.perf_counter() - started
        wanted = False
        for store, projection, write in self.writes:
            if projection.wants(envelope):
                wanted = True
                started = time.perf_counter()
                await write(item)
                self.seconds[store] += time.perf_counter() - started
        self.handled += wanted

    def _postgres(self, projection: DocumentProjection, table: str) -> Write:
        async def write(item: Projected) -> None:
            changes = projection.apply(None, item)
            row = {**changes, "id": item.aggregate_id, "version": item.version}
            await self._conn.execute(self._upsert(table, frozenset(row)), _json(row))

        return write

    def _upsert(self, table: str, fields: frozenset[str]) -> str:
        key = (table, fields)
        if key not in self._sql:
            sets = ", ".join(f"{name} = EXCLUDED.{name}" for name in sorted(fields - {"id"}))
            self._sql[key] = (
                f"INSERT INTO {table} SELECT * FROM jsonb_populate_record(NULL::{table}, $1::jsonb)"
                f" ON CONFLICT (id) DO UPDATE SET {sets}"
            )
        return self._sql[key]

    async def _statistics(self, item: Projected) -> None:
        await self._stats.apply_batch(self._conn, [item], stats_tables(self._targets))

    def _redis(self, projection: DocumentProjection) -> Write:
        async def write(item: Projected) -> None:
            changes = projection.apply(None, item)
            fields: dict[Any, Any] = {k: to_field(v) for k, v in changes.items() if v is not None}
            fields["_v"] = str(item.version)
            await self._resources.redis.hset(
                self._targets.redis_prefix + item.aggregate_id, mapping=fields
            )

        return write

    def _elasticsearch(self, projection: DocumentProjection) -> Write:
        async def write(item: Projected) -> None:
            changes = projection.apply(None, item)
            await self._resources.elasticsearch.update(
                index=self._targets.index,
                id=item.aggregate_id,
                doc={**changes, "_v": item.version},
                doc_as_upsert=True,
            )

        return write


def _json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str)


async def naive_baseline(
    resources: Resources, end_offsets: dict[int, int], events: int, batch: int
) -> dict[str, Any]:
    """Run the naive consumer over ``events`` messages from the middle of each partition."""
    targets = targets_for(resources, "naive")
    await create_targets(resources, targets)
    middle = {partition: end // 2 for partition, end in end_offsets.items()}
    kafka = resources.settings.kafka
    async with resources.pool.acquire() as conn, topic_reader(kafka, batch, middle) as consumer:
        naive = NaiveConsumer(resources, conn, targets)
        seen = 0
        started = time.perf_counter()
        while seen < events:
            for record in (await next_records(consumer, batch))[: events - seen]:
                await naive.handle(record.value)
                seen += 1
        seconds = time.perf_counter() - started
    return {
        "events": seen,
        "handled_events": naive.handled,
        "seconds": seconds,
        "slice_events_per_s": rate(seen, seconds),
        "seconds_by_step": naive.seconds,
        "per_store_per_s": {
            store: rate(naive.handled, naive.seconds[store])
            for store in ("postgres", "redis", "elasticsearch")
        },
    }


def stream_rate(baseline: dict[str, Any], total: int, handled_in_stream: int) -> float:
    """The baseline's events per second over the whole stream (unhandled events cost nothing)."""
    per_handled = baseline["seconds"] / max(1, baseline["handled_events"])
    return rate(total, per_handled * handled_in_stream)
