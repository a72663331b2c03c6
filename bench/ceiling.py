"""The ceiling: how fast each store ingests the engine's documents by its best bulk path.

One pass over the topic, batch by batch as the daemon fetches them. Each batch
is decoded (timed apart: the CPU every event costs in Python) and folded in
memory into the very documents the engine writes (one per changed aggregate
and projection, untimed); then each store gets them through its fastest path,
timed store by store, with nothing of the engine's in between (no reads, no
version checks, no locks, no progress records):

- Postgres: COPY into a staging table, then one multi-row ``INSERT ... ON
  CONFLICT DO UPDATE`` per table, in one transaction per batch;
- Redis: one non-transactional pipeline of ``HSET`` per batch;
- Elasticsearch: one ``_bulk`` of ``index`` actions per batch.

Kafka's ceiling is a separate raw pass: ``getmany`` until every message is
read, no decoding. A rate is events of the stream per second of that step, so
it compares directly with the engine's events per second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.stats import rate
from bench.targets import (
    Records,
    Targets,
    column_types,
    create_targets,
    next_records,
    pg_value,
    targets_for,
    topic_reader,
)
from engine import DocumentProjection, KafkaSettings, Projected, Resources
from engine.codec import decode
from engine.projection import Document, fold
from engine.stores.redis import to_field
from projections.orders import APP
from projections.orders.views import CustomerOrders, OrderDetails, OrderQuickLookup, OrderSearch

Docs = dict[str, tuple[Document, int]]


async def kafka_consume_seconds(kafka: KafkaSettings, total: int, batch: int) -> float:
    """Seconds to read ``total`` messages with aiokafka, nothing else."""
    async with topic_reader(kafka, batch) as consumer:
        await consumer.getmany(timeout_ms=0)  # connect before the clock starts
        started = time.perf_counter()
        seen = 0
        while seen < total:
            seen += len(await next_records(consumer, batch))
        return time.perf_counter() - started


@dataclass
class _Timers:
    decode: float = 0.0
    postgres: float = 0.0
    redis: float = 0.0
    elasticsearch: float = 0.0
    writes: dict[str, int] = field(default_factory=dict)


class _Folder:
    """The engine's documents, folded in memory for each document projection."""

    def __init__(self) -> None:
        self.projections: dict[str, DocumentProjection] = {
            p.name: p for p in (OrderDetails(), CustomerOrders(), OrderQuickLookup(), OrderSearch())
        }
        self._current: dict[str, dict[str, tuple[Document | None, int]]] = {
            name: {} for name in self.projections
        }

    def changed(self, items: Sequence[Projected]) -> dict[str, Docs]:
        result: dict[str, Docs] = {}
        for name, projection in self.projections.items():
            wanted = [item for item in items if projection.wants(item.envelope)]
            current = self._current[name]
            docs = fold(projection, current, wanted)
            current.update(docs)
            result[name] = docs
        return result


class _Writer:
    """Raw bulk writes of one batch of documents to each store."""

    def __init__(self, resources: Resources, targets: Targets) -> None:
        self._resources = resources
        self._targets = targets
        self._columns: dict[str, list[tuple[str, str]]] = {}

    async def prepare(self) -> None:
        await create_targets(self._resources, self._targets)
        async with self._resources.pool.acquire() as conn:
            for table in (self._targets.details, self._targets.listing, self._targets.stats_orders):
                self._columns[table] = await column_types(conn, table)

    async def postgres(self, docs: dict[str, Docs]) -> None:
        stats = {
            order_id: {
                "order_id": order_id,
                "day": doc["created_at"],
                "status": doc["status"],
                "total": doc["total"],
            }
            for order_id, (doc, _) in docs[OrderDetails.name].items()
        }
        async with self._resources.pool.acquire() as conn, conn.transaction():
            await self._upsert(conn, self._targets.details, "id", _keyed(docs[OrderDetails.name]))
            await self._upsert(conn, self._targets.listing, "id", _keyed(docs[CustomerOrders.name]))
            await self._upsert(conn, self._targets.stats_orders, "order_id", list(stats.values()))

    async def _upsert(self, conn: Any, table: str, key: str, docs: list[Document]) -> None:
        if not docs:
            return
        columns = self._columns[table]
        stage = f"stage_{table}"
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS"
        )
        records = [tuple(pg_value(doc.get(name), kind) for name, kind in columns) for doc in docs]
        await conn.copy_records_to_table(stage, records=records)
        sets = ", ".join(f"{name} = EXCLUDED.{name}" for name, _ in columns if name != key)
        await conn.execute(
            f"INSERT INTO {table} SELECT * FROM {stage} ON CONFLICT ({key}) DO UPDATE SET {sets}"
        )

    async def redis(self, docs: Docs) -> None:
        async with self._resources.redis.pipeline(transaction=False) as pipe:
            for order_id, (doc, version) in docs.items():
                fields: dict[Any, Any] = {k: to_field(v) for k, v in doc.items() if v is not None}
                fields["_v"] = str(version)
                pipe.hset(self._targets.redis_prefix + order_id, mapping=fields)
            await pipe.execute()

    async def elasticsearch(self, docs: Docs) -> None:
        if not docs:
            return
        operations: list[dict[str, Any]] = []
        for order_id, (doc, version) in docs.items():
            operations += [
                {"index": {"_index": self._targets.index, "_id": order_id}},
                {**doc, "_v": version},
            ]
        response = await self._resources.elasticsearch.bulk(operations=operations)
        if response["errors"]:
            raise RuntimeError(f"the ceiling's _bulk failed: {response['items'][:1]}")


def _keyed(docs: Docs) -> list[Document]:
    return [{**doc, "id": key, "version": version} for key, (doc, version) in docs.items()]


async def store_ceilings(resources: Resources, total: int, batch: int) -> dict[str, Any]:
    """Decode, fold and bulk-write the whole topic; per store, events of the stream per second."""
    writer = _Writer(resources, targets_for(resources, "ceiling"))
    await writer.prepare()
    folder = _Folder()
    timers = _Timers()
    kafka = resources.settings.kafka
    async with topic_reader(kafka, batch) as consumer:
        seen = 0
        while seen < total:
            records = await next_records(consumer, batch)
            seen += len(records)
            await _one_batch(records, folder, writer, timers)
    return {
        "decode_per_s": rate(total, timers.decode),
        "postgres_per_s": rate(total, timers.postgres),
        "redis_per_s": rate(total, timers.redis),
        "elasticsearch_per_s": rate(total, timers.elasticsearch),
        "seconds": {
            "decode": timers.decode,
            "postgres": timers.postgres,
            "redis": timers.redis,
            "elasticsearch": timers.elasticsearch,
        },
        "documents_written": timers.writes,
    }


async def _one_batch(records: Records, folder: _Folder, writer: _Writer, timers: _Timers) -> None:
    started = time.perf_counter()
    items = [_decoded(record.value) for record in records]
    timers.decode += time.perf_counter() - started
    docs = folder.changed(items)
    for name, changed in docs.items():
        timers.writes[name] = timers.writes.get(name, 0) + len(changed)
    started = time.perf_counter()
    await writer.postgres(docs)
    timers.postgres += time.perf_counter() - started
    started = time.perf_counter()
    await writer.redis(docs[OrderQuickLookup.name])
    timers.redis += time.perf_counter() - started
    started = time.perf_counter()
    await writer.elasticsearch(docs[OrderSearch.name])
    timers.elasticsearch += time.perf_counter() - started


def _decoded(value: bytes | None) -> Projected:
    envelope = decode(value)
    return Projected(envelope, APP.registry.decode(envelope))
