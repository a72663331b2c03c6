"""The outbox relay against real Postgres and Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from engine import (
    CommandBus,
    ConfigurationError,
    ConflictError,
    ConsistencyToken,
    OutboxRelay,
    RelaySettings,
    Settings,
    ensure_topic,
    partition_for,
)
from engine.postgres import outbox
from projections.orders import CancelOrder, ConfirmOrder
from tests.helpers import (
    assert_in_order_without_gaps,
    consume,
    new_customer,
    new_order,
    new_product,
)

HOLD_LOCK = 777_777


def _relay(settings: Settings, name: str = "relay", **overrides: float) -> OutboxRelay:
    relay_settings = RelaySettings(**{"poll_interval_s": 0.2, "standby_retry_s": 0.1, **overrides})
    return OutboxRelay(settings.postgres, settings.kafka, relay_settings, name=name)


async def _wait_until_published(pool: asyncpg.Pool, timeout_s: float = 30.0) -> None:
    async def pending() -> int:
        async with pool.acquire() as conn:
            return await outbox.pending_count(conn)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await pending():
        assert loop.time() < deadline, "the relay did not publish everything in time"
        await asyncio.sleep(0.05)


async def _orders(bus: CommandBus, count: int) -> list[uuid.UUID]:
    customer = await new_customer(bus)
    product = await new_product(bus)
    return [
        uuid.UUID((await new_order(bus, customer, [(product, 1)])).aggregate_id)
        for _ in range(count)
    ]


async def test_relay_publishes_every_event_keyed_by_aggregate_with_id_headers(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    orders = await _orders(bus, 5)
    for order in orders:
        await bus.execute(ConfirmOrder(order_id=order))
    total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
    assert await _relay(settings_for_test).drain() == total
    assert await pool.fetchval("SELECT count(*) FROM engine_outbox WHERE published_at IS NULL") == 0

    events = await consume(settings_for_test.kafka, total)
    assert sorted(e.position for e in events) == list(range(1, total + 1))
    assert_in_order_without_gaps(events)


@pytest.fixture
async def held_cancellations(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """While the yielded connection holds HOLD_LOCK, an OrderCancelled insert waits inside
    its transaction: the event has its position but is not committed."""
    await pool.execute(
        f"""
        CREATE OR REPLACE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock({HOLD_LOCK}); RETURN NULL; END $$;
        CREATE TRIGGER test_hold AFTER INSERT ON engine_event_log FOR EACH ROW
            WHEN (NEW.event_type = 'OrderCancelled') EXECUTE FUNCTION test_hold();
        """
    )
    holder = await pool.acquire()
    await holder.execute("SELECT pg_advisory_lock($1)", HOLD_LOCK)
    try:
        yield holder
    finally:
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await pool.release(holder)
        await pool.execute("DROP TRIGGER test_hold ON engine_event_log; DROP FUNCTION test_hold();")


async def _wait_for_lock_waiter(pool: asyncpg.Pool) -> None:
    for _ in range(200):
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = $1",
            HOLD_LOCK,
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the held transaction never reached the lock")


async def test_a_transaction_committing_late_is_not_skipped(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    held_cancellations: asyncpg.Connection,
) -> None:
    order_a, order_b = await _orders(bus, 2)
    relay = _relay(settings_for_test)
    published_first = await relay.drain()

    slow = asyncio.create_task(bus.execute(CancelOrder(order_id=order_a, reason="slow")))
    await _wait_for_lock_waiter(pool)
    # Same aggregate while A's change is in flight: waits for it, then conflicts.
    racing = asyncio.create_task(bus.execute(ConfirmOrder(order_id=order_a)))
    fast = await bus.execute(ConfirmOrder(order_id=order_b))
    assert await relay.drain() == 1  # B's confirmation; A's cancellation is not visible yet

    await held_cancellations.execute("SELECT pg_advisory_unlock($1)", HOLD_LOCK)
    cancelled = await slow
    with pytest.raises(ConflictError):
        await racing
    # The trap: A's event got its position before B's but committed after it. A relay
    # following "position > last published" would now be past it for ever.
    assert cancelled.position is not None and fast.position is not None
    assert cancelled.position < fast.position
    assert await relay.drain() == 1

    events = await consume(settings_for_test.kafka, published_first + 2)
    assert {e.position for e in events} == set(range(1, published_first + 3))
    assert_in_order_without_gaps(events)


async def test_two_relays_at_once_lose_nothing_and_keep_each_aggregate_in_order(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    stop = asyncio.Event()
    relays = [_relay(settings_for_test, f"relay-{n}", batch_size=7) for n in (1, 2)]
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        orders = await _orders(bus, 12)
        await asyncio.gather(*(bus.execute(ConfirmOrder(order_id=o)) for o in orders))
        await asyncio.gather(*(bus.execute(CancelOrder(order_id=o, reason="r")) for o in orders))
        total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
        await _wait_until_published(pool)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert sum(r.stats.published for r in relays) >= total
    events = await consume(settings_for_test.kafka, total)
    assert {e.position for e in events} == set(range(1, total + 1))
    assert_in_order_without_gaps(events)


async def test_a_standby_relay_takes_over_when_the_leader_stops(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    leader_stop, standby_stop = asyncio.Event(), asyncio.Event()
    leader, standby = _relay(settings_for_test, "leader"), _relay(settings_for_test, "standby")
    leader_task = asyncio.create_task(leader.run(leader_stop))
    for _ in range(100):
        if leader.is_leader:
            break
        await asyncio.sleep(0.05)
    standby_task = asyncio.create_task(standby.run(standby_stop))
    try:
        await _orders(bus, 3)
        await asyncio.sleep(0.5)
        assert leader.is_leader and not standby.is_leader
        leader_stop.set()
        await asyncio.wait_for(leader_task, timeout=30)
        await _orders(bus, 3)
        await _wait_until_published(pool)
        assert standby.is_leader
    finally:
        standby_stop.set()
        await asyncio.wait_for(standby_task, timeout=30)
    total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
    assert leader.stats.published + standby.stats.published == total
    assert {e.position for e in await consume(settings_for_test.kafka, total)} == set(
        range(1, total + 1)
    )


async def test_published_rows_are_purged_after_retention_but_the_log_keeps_them(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    await _orders(bus, 2)
    total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
    await _relay(settings_for_test, retention_hours=0).drain()
    assert await pool.fetchval("SELECT count(*) FROM engine_outbox") == 0
    assert await pool.fetchval("SELECT count(*) FROM engine_event_log") == total


async def test_notify_wakes_the_relay_long_before_its_poll(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    stop = asyncio.Event()
    relay = _relay(settings_for_test, poll_interval_s=60.0)
    task = asyncio.create_task(relay.run(stop))
    try:
        for _ in range(200):
            if relay.is_leader:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # let it finish its first (empty) read and go to sleep
        await new_customer(bus)
        # With a 60 s poll, only the notification can make this happen within the wait.
        await _wait_until_published(pool, timeout_s=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    assert relay.stats.published == 1


async def test_the_topic_is_created_with_the_configured_partitions(
    bus: CommandBus, settings_for_test: Settings
) -> None:
    await new_customer(bus)
    await _relay(settings_for_test).drain()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings_for_test.kafka.bootstrap_servers)
    await admin.start()
    try:
        [described] = await admin.describe_topics([settings_for_test.kafka.topic])
    finally:
        await admin.close()
    partitions = {p["partition"] for p in described["partitions"]}
    assert partitions == set(range(settings_for_test.kafka.partitions))


async def test_each_event_goes_to_the_partition_its_consistency_token_names(
    bus: CommandBus, settings_for_test: Settings
) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    results = [await new_order(bus, customer, [(product, 1)]) for _ in range(12)]
    await _relay(settings_for_test).drain()
    kafka = settings_for_test.kafka
    consumer = AIOKafkaConsumer(
        kafka.topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: dict[int, int] = {}  # position -> partition
    try:
        while len(seen) < 14:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    seen[int(dict(record.headers)["position"])] = record.partition
    finally:
        await consumer.stop()
    for result in results:
        token = ConsistencyToken.of(result, kafka.partitions)
        assert token is not None
        assert (
            seen[token.position]
            == token.partition
            == partition_for(result.aggregate_id, kafka.partitions)
        )
    assert len(set(seen.values())) > 1  # spread over partitions, not all on one


async def test_a_topic_with_another_partition_count_is_refused(
    bus: CommandBus, settings_for_test: Settings
) -> None:
    await new_customer(bus)
    await ensure_topic(settings_for_test.kafka)  # 3 partitions
    wrong = settings_for_test.kafka.model_copy(update={"partitions": 5})
    relay = OutboxRelay(settings_for_test.postgres, wrong, RelaySettings())
    with pytest.raises(ConfigurationError) as caught:
        await relay.drain()
    assert "ENGINE_KAFKA__PARTITIONS" in str(caught.value)
    assert "3 partitions" in str(caught.value)
