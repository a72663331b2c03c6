"""Side targets the ceiling and the naive baseline write to, next to the engine's own.

Each gets tables, a Redis prefix and an index of its own (``kind`` is
``ceiling`` or ``naive``) with the same schemas and mappings as the engine's
projections, so all three write the same documents into the same shapes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from engine import KafkaSettings, Resources
from engine.postgres.pool import Connection
from projections.orders.views import CustomerOrders, OrderDetails, OrderSearch, OrderStats

Records = list[ConsumerRecord[bytes, bytes]]


@dataclass(frozen=True)
class Targets:
    """Where one side writes: three Postgres tables, a Redis prefix, an index."""

    details: str
    listing: str
    stats_daily: str
    stats_orders: str
    redis_prefix: str
    index: str


def targets_for(resources: Resources, kind: str) -> Targets:
    settings = resources.settings
    return Targets(
        details=f"{kind}_order_details",
        listing=f"{kind}_customer_orders",
        stats_daily=f"{kind}_order_stats_daily",
        stats_orders=f"{kind}_order_stats_orders",
        redis_prefix=f"{settings.redis.key_prefix}{kind}:",
        index=f"{settings.elasticsearch.index_prefix}-{kind}",
    )


async def create_targets(resources: Resources, targets: Targets) -> None:
    """The tables and the index, with the projections' own schema and mappings."""
    async with resources.pool.acquire() as conn:
        await conn.execute(OrderDetails.SCHEMA.format(table=targets.details))
        await conn.execute(CustomerOrders.SCHEMA.format(table=targets.listing))
        await conn.execute(
            OrderStats.schema.format(
                order_stats_daily=targets.stats_daily, order_stats_orders=targets.stats_orders
            )
        )
    properties = {**OrderSearch.MAPPINGS["properties"], "_v": {"type": "integer"}}
    await resources.elasticsearch.indices.create(
        index=targets.index,
        mappings={**OrderSearch.MAPPINGS, "properties": properties},
        settings={"number_of_shards": 1, "number_of_replicas": 0},
    )


def stats_tables(targets: Targets) -> dict[str, str]:
    return {"order_stats_daily": targets.stats_daily, "order_stats_orders": targets.stats_orders}


async def column_types(conn: Connection, table: str) -> list[tuple[str, str]]:
    """(column, type) of ``table`` in column order."""
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table,
    )
    return [(row["attname"], row["type"]) for row in rows]


def _date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _timestamp(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _numeric(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


# Postgres type (as format_type spells it, before any modifier) -> converter.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "jsonb": lambda value: json.dumps(value, default=str),
    "numeric": _numeric,
    "timestamp with time zone": _timestamp,
    "date": _date,
    "integer": int,
    "bigint": int,
}


def pg_value(value: Any, column_type: str) -> Any:
    """A document value as asyncpg's binary COPY wants it for ``column_type``."""
    if value is None:
        return None
    return _CONVERTERS.get(column_type.split("(", 1)[0], str)(value)


@contextlib.asynccontextmanager
async def topic_reader(
    kafka: KafkaSettings, batch: int, start: dict[int, int] | None = None
) -> AsyncIterator[AIOKafkaConsumer]:
    """A group-less consumer on every partition, from ``start`` offsets (default: the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(kafka.topic, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        if start is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, start.get(tp.partition, 0))
        yield consumer
    finally:
        await consumer.stop()


async def next_records(consumer: AIOKafkaConsumer, batch: int) -> Records:
    """One fetch, flattened: what the daemon's dispatcher gets per batch."""
    fetched: dict[TopicPartition, Records] = await consumer.getmany(
        timeout_ms=1000, max_records=batch
    )
    return [record for records in fetched.values() for record in records]
