"""In-partition order when one send to Kafka fails and the sends after it succeed.

The fault is injected into the real producer (the only fake here): one chosen
send to one partition fails once, without reaching Kafka, as an expired batch
does. Everything else is real, and the assertions read the real topic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from engine import (
    KafkaSettings,
    OutboxRelay,
    RelaySettings,
    ServiceUnavailableError,
    Settings,
    partition_for,
)
from engine.codec import decode
from engine.drivers import kafka_address
from engine.postgres import outbox
from tests.helpers import assert_in_order_without_gaps

AGGREGATES = 12
VERSIONS = 6


async def _append_interleaved(pool: asyncpg.Pool) -> int:
    """AGGREGATES x VERSIONS events, interleaved across aggregates as real traffic is."""
    now = datetime.now(UTC)
    rows = [
        (uuid.uuid4(), "SyntheticHappened", 1, "synthetic", f"agg-{a}", v, now, uuid.uuid4(),
         uuid.uuid4(), f'{{"n": {v}, "pad": "{"x" * 200}"}}')
        for v in range(1, VERSIONS + 1)
        for a in range(AGGREGATES)
    ]  # fmt: skip
    async with pool.acquire() as conn, conn.transaction():
        await outbox.append(conn, rows)
    return len(rows)


@dataclass
class _Fault:
    """Fail the ``call``-th send (record or record batch) to ``partition``, once."""

    partition: int
    call: int
    seen: int = 0
    fired: bool = False

    def fires(self, partition: int | None) -> bool:
        if self.fired or partition != self.partition:
            return False
        self.seen += 1
        self.fired = self.seen == self.call
        return self.fired


class _FaultyProducer(AIOKafkaProducer):  # type: ignore[misc]
    """The real producer, but the chosen send fails without reaching Kafka."""

    def __init__(self, fault: _Fault, **config: Any) -> None:
        super().__init__(**config)
        self._fault = fault

    @staticmethod
    def _failed() -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(KafkaTimeoutError("injected: batch expired"))
        return future

    async def send(self, topic: str, *args: Any, partition: int | None = None, **kw: Any) -> Any:
        if self._fault.fires(partition):
            return self._failed()
        return await super().send(topic, *args, partition=partition, **kw)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        if self._fault.fires(partition):
            return self._failed()
        return await super().send_batch(batch, topic, partition=partition)


def _factory(fault: _Fault) -> Any:
    def make(kafka: KafkaSettings) -> AIOKafkaProducer:
        # Small record batches, so one partition's share of a relay batch spans several.
        return _FaultyProducer(
            fault,
            bootstrap_servers=kafka.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            max_batch_size=1024,
            request_timeout_ms=int(kafka.request_timeout_s * 1000),
        )

    return make


async def _read_topic(kafka: KafkaSettings, at_least: int) -> list[tuple[int, int, Any]]:
    """Every record as (partition, offset, event), partition by partition in offset order."""
    consumer = AIOKafkaConsumer(
        kafka.topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    found: list[tuple[int, int, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    try:
        while loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                found.extend((m.partition, m.offset, decode(m.value)) for m in messages)
            if len(found) >= at_least and not batches:
                break
    finally:
        await consumer.stop()
    return sorted(found, key=lambda r: (r[0], r[1]))


async def test_a_failed_send_then_successful_ones_never_put_a_version_before_its_predecessor(
    pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    total = await _append_interleaved(pool)
    kafka = settings_for_test.kafka
    busiest = Counter(
        partition_for(f"agg-{a}", kafka.partitions) for a in range(AGGREGATES)
    ).most_common(1)[0][0]
    fault = _Fault(partition=busiest, call=2)  # the first send to it succeeds, the second fails
    relay = OutboxRelay(
        settings_for_test.postgres,
        kafka,
        RelaySettings(batch_size=total),
        producer_factory=_factory(fault),
    )
    with pytest.raises(ServiceUnavailableError) as failed:
        await relay.drain()  # the injected failure, translated by the Kafka seam
    assert fault.fired
    assert (failed.value.service, failed.value.address) == ("Kafka", kafka_address(kafka))
    assert isinstance(failed.value.__cause__, KafkaTimeoutError)
    async with pool.acquire() as conn:
        # What was acknowledged is marked (the other partitions, the first send to this
        # one); the rest of that partition waits for the next round.
        assert 0 < await outbox.pending_count(conn) < total
    await relay.drain()  # the next round resends what was not acknowledged

    records = await _read_topic(kafka, total)
    events = [event for _, _, event in records]
    assert {e.position for e in events} == set(range(1, total + 1))  # every event published
    # Per partition, in offset order: each aggregate's versions first appear as 1, 2, ...
    assert_in_order_without_gaps(events)

    # Every row marked published names the partition and offset that hold its event.
    where = {(partition, offset): event.position for partition, offset, event in records}
    rows = await pool.fetch(
        "SELECT position, kafka_partition, kafka_offset FROM engine_outbox ORDER BY position"
    )
    assert len(rows) == total
    for row in rows:
        assert where[(row["kafka_partition"], row["kafka_offset"])] == row["position"], dict(row)
