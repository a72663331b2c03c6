"""Poison never blocks a partition: it is dead-lettered with its bytes, and can be replayed."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from aiokafka import AIOKafkaProducer

from engine import (
    CommandBus,
    OutboxRelay,
    Resources,
    Settings,
)
from engine.daemon import build_runner
from engine.dlq import replay
from engine.postgres.deadletters import DeadLetterStore
from projections.orders import ConfirmOrder
from tests.helpers import new_customer, new_order, new_product, run_engine
from tests.integration.read.fussy import Fussy, app_with_fussy


async def _relay(settings: Settings) -> None:
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()


async def test_poison_goes_to_the_dead_letters_and_the_partition_keeps_flowing(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    Fussy.refused = {"Poison Pill"}
    app = app_with_fussy()
    good = await new_customer(bus, "Ada Lovelace")
    bad = await new_customer(bus, "Poison Pill")
    product = await new_product(bus)
    order = (await new_order(bus, good, [(product, 1)])).aggregate_id
    refused = (await new_order(bus, bad, [(product, 2)])).aggregate_id
    await _relay(settings_for_test)

    # Garbage and an unknown event type, on the same partition as the order, before its next event.
    producer = AIOKafkaProducer(bootstrap_servers=settings_for_test.kafka.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings_for_test.kafka.topic, b"\x00not json", key=order.encode()
        )
        unknown = (
            b'{"event_id": "%s", "event_type": "OrderTeleported", "schema_version": 1,'
            b' "aggregate_type": "order", "aggregate_id": "%s", "aggregate_version": 99,'
            b' "position": 999999, "occurred_at": "2026-01-01T00:00:00Z",'
            b' "correlation_id": "%s", "causation_id": "%s", "payload": {}}'
        ) % (
            str(uuid.uuid4()).encode(),
            order.encode(),
            str(uuid.uuid4()).encode(),
            str(uuid.uuid4()).encode(),
        )
        await producer.send_and_wait(settings_for_test.kafka.topic, unknown, key=order.encode())
    finally:
        await producer.stop()
    await bus.execute(ConfirmOrder(order_id=uuid.UUID(order)))  # after the poison, same partition
    await _relay(settings_for_test)

    runner = build_runner(app, resources)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)

    assert (
        await pool.fetchval("SELECT status FROM order_details WHERE id = $1", order) == "CONFIRMED"
    )
    assert (
        await pool.fetchval("SELECT name FROM fussy_orders WHERE id = $1", order) == "Ada Lovelace"
    )
    assert await pool.fetchval("SELECT count(*) FROM fussy_orders WHERE id = $1", refused) == 0
    # The refused order reached every other projection.
    assert (
        await pool.fetchval("SELECT status FROM order_details WHERE id = $1", refused) == "PENDING"
    )

    letters = await DeadLetterStore(pool).list()
    by_kind = {(d.projection, d.event_type): d for d in letters}
    assert set(by_kind) == {("*", None), ("fussy", "OrderCreated")}
    assert len(letters) == 3  # two undecodable for every projection, one refused by fussy
    undecodable = [d for d in letters if d.value == b"\x00not json"]
    assert undecodable and "EventDecodeError" in undecodable[0].error
    assert any("OrderTeleported" in d.error for d in letters)
    fussy_letter = by_kind[("fussy", "OrderCreated")]
    assert "cannot handle Poison Pill" in fussy_letter.error
    assert fussy_letter.attempts == settings_for_test.runner.max_attempts

    # Fix the bug, replay: the projection catches up on exactly that event.
    Fussy.refused = set()
    outcome = await replay(fussy_letter, app, resources)
    assert outcome.ok, outcome.detail
    assert (
        await pool.fetchval("SELECT name FROM fussy_orders WHERE id = $1", refused) == "Poison Pill"
    )
    assert [d.id for d in await DeadLetterStore(pool).list()] == sorted(
        d.id for d in letters if d.id != fussy_letter.id
    )


async def test_dlq_list_command_shows_the_letters(
    pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    await pool.execute(
        'INSERT INTO engine_dead_letters (projection, topic, partition, "offset", value,'
        " headers, event_type, error, attempts) VALUES ('order_search', 't', 0, 5, 'x', '{}',"
        " 'OrderCreated', 'ValueError: boom', 3)"
    )
    env = {"ENGINE_POSTGRES__DATABASE": settings_for_test.postgres.database}
    code, out, err = await run_engine("dlq", "list", env=env)
    assert code == 0, err
    assert "order_search" in out and "ValueError: boom" in out
    code, out, _ = await run_engine("dlq", "replay", "424242", env=env)
    assert code == 1
    assert "no such dead letter" in out
