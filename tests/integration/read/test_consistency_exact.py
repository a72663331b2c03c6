"""Consistency tokens are exact: never passed before the write is applied, never for a dead letter.

The interleaving that threatens them: two commands on the same partition whose
positions commit out of order. The first command draws its position, then is
held inside its transaction (a trigger on the event log waits for an advisory
lock this test holds); the second commits, is published and applied. When the
first finally commits, its position is *below* what the projection has
processed on that partition, yet its event is not published, let alone applied.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine import (
    CommandBus,
    ConsistencyGate,
    ConsistencyToken,
    NotYetConsistentError,
    OutboxRelay,
    Resources,
    Settings,
)
from engine.daemon import build_runner
from engine.errors import WriteNotAppliedError
from engine.partitioning import partition_for
from projections.orders import APP, ConfirmOrder, CreateOrder, OrderItemRequest
from tests.helpers import ADDRESS, new_customer, new_product
from tests.integration.read.fussy import Fussy, app_with_fussy

PROJECTIONS = ("order_details", "order_quick_lookup", "customer_orders", "order_search")
HOLD = 0x686F6C64  # the advisory lock the trigger waits for

_HOLD_TRIGGER = f"""
CREATE TABLE test_hold (aggregate_id text PRIMARY KEY);
CREATE FUNCTION test_hold_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM test_hold WHERE aggregate_id = NEW.aggregate_id) THEN
    PERFORM pg_advisory_xact_lock_shared({HOLD});
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER test_hold_append AFTER INSERT ON engine_event_log
  FOR EACH ROW EXECUTE FUNCTION test_hold_append();
"""


@pytest.fixture
async def hold_trigger(pool: asyncpg.Pool, settings_for_test: Settings) -> AsyncIterator[None]:
    async with pool.acquire() as conn:
        await conn.execute(_HOLD_TRIGGER)
    yield
    async with pool.acquire() as conn:
        await conn.execute("DROP TRIGGER test_hold_append ON engine_event_log")
        await conn.execute("DROP FUNCTION test_hold_append()")
        await conn.execute("DROP TABLE test_hold")


def _same_partition_ids(partitions: int) -> tuple[uuid.UUID, uuid.UUID]:
    first = uuid.uuid4()
    while True:
        other = uuid.uuid4()
        if partition_for(str(other), partitions) == partition_for(str(first), partitions):
            return first, other


async def _create(bus: CommandBus, order_id: uuid.UUID, customer: str, product: str) -> None:
    await bus.execute(
        CreateOrder(
            order_id=order_id,
            customer_id=uuid.UUID(customer),
            items=[OrderItemRequest(product_id=uuid.UUID(product), quantity=1)],
            shipping_address=ADDRESS,
        )
    )


async def _waiting_on_hold(pool: asyncpg.Pool) -> bool:
    waiting = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1",
        HOLD,
    )
    return bool(waiting)


async def _until(check: object, timeout_s: float = 60.0) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def test_a_token_never_passes_before_its_write_when_positions_commit_out_of_order(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    hold_trigger: None,
) -> None:
    partitions = settings_for_test.kafka.partitions
    customer, product = await new_customer(bus), await new_product(bus)
    held_id, other_id = _same_partition_ids(partitions)
    await _create(bus, held_id, customer, product)
    await _create(bus, other_id, customer, product)

    relay = OutboxRelay(
        settings_for_test.postgres,
        settings_for_test.kafka,
        settings_for_test.relay.model_copy(update={"poll_interval_s": 0.1}),
    )
    stop_daemon, stop_relay = asyncio.Event(), asyncio.Event()
    daemon = asyncio.create_task(build_runner(APP, resources).run(stop_daemon))
    relaying = asyncio.create_task(relay.run(stop_relay))
    gate = ConsistencyGate(pool, settings_for_test.kafka.topic, timeout_s=0.5)
    holder = await asyncpg.connect(settings_for_test.postgres.dsn())
    try:
        # The held confirm draws its position, then waits inside its transaction.
        await holder.execute("SELECT pg_advisory_lock($1)", HOLD)
        await pool.execute("INSERT INTO test_hold VALUES ($1)", str(held_id))
        held = asyncio.create_task(bus.execute(ConfirmOrder(order_id=held_id)))
        await _until(lambda: _waiting_on_hold(pool))

        # Another order on the same partition commits with a higher position and is applied.
        other = await bus.execute(ConfirmOrder(order_id=other_id))
        other_token = ConsistencyToken.of(other, partitions)
        assert other_token is not None
        await _gate_passes(gate, other_token)

        # The relay stops, so the held write cannot be published behind our back.
        stop_relay.set()
        await relaying
        await holder.execute("SELECT pg_advisory_unlock($1)", HOLD)
        result = await held
        token = ConsistencyToken.of(result, partitions)
        assert token is not None and token.position < other_token.position

        # The write is not applied anywhere yet: the gate must not pass it.
        row = await pool.fetchrow(
            "SELECT status, version FROM order_details WHERE id = $1", str(held_id)
        )
        assert row is not None and (row["status"], row["version"]) == ("PENDING", 1)
        with pytest.raises(NotYetConsistentError):
            await gate.wait(PROJECTIONS, token)

        # Once published and applied, it passes and the read shows the write.
        relaying = asyncio.create_task(relay.run(stop_relay := asyncio.Event()))
        await _gate_passes(gate, token)
        row = await pool.fetchrow(
            "SELECT status, version FROM order_details WHERE id = $1", str(held_id)
        )
        assert row is not None and (row["status"], row["version"]) == ("CONFIRMED", 2)
    finally:
        stop_relay.set()
        stop_daemon.set()
        await asyncio.gather(relaying, daemon, return_exceptions=True)
        await holder.close()


async def _gate_passes(gate: ConsistencyGate, token: ConsistencyToken) -> None:
    for _ in range(120):
        try:
            await gate.wait(PROJECTIONS, token)
            return
        except NotYetConsistentError:
            continue
    raise AssertionError(f"token {token.encode()} never reached")


async def test_a_dead_lettered_write_is_reported_not_passed(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    Fussy.refused = {"Poison Pill"}

    app = app_with_fussy()
    partitions = settings_for_test.kafka.partitions
    bad, product = await new_customer(bus, "Poison Pill"), await new_product(bus)
    refused_id, fine_id = _same_partition_ids(partitions)
    await _create(bus, refused_id, bad, product)
    fine_customer = await new_customer(bus, "Ada Lovelace")
    await _create(bus, fine_id, fine_customer, product)
    refused = await bus.execute(ConfirmOrder(order_id=refused_id))
    fine = await bus.execute(ConfirmOrder(order_id=fine_id))
    await OutboxRelay(
        settings_for_test.postgres, settings_for_test.kafka, settings_for_test.relay
    ).drain()
    runner = build_runner(app, resources)
    await runner.run(asyncio.Event(), until_caught_up=True)

    gate = ConsistencyGate(pool, settings_for_test.kafka.topic, timeout_s=5)
    fine_token = ConsistencyToken.of(fine, partitions)
    await gate.wait(["fussy", "order_details"], fine_token)
    # The confirm itself is not for Fussy, but the order's creation was dead-lettered there.
    with pytest.raises(WriteNotAppliedError) as refused_error:
        await gate.wait(["fussy"], ConsistencyToken.of(refused, partitions))
    assert refused_error.value.projection == "fussy"
    letter = await pool.fetchval(
        "SELECT id FROM engine_dead_letters WHERE projection = 'fussy' AND replayed_at IS NULL"
    )
    assert refused_error.value.letter_id == letter
    # Other projections applied it: their reads pass.
    await gate.wait(["order_details"], ConsistencyToken.of(refused, partitions))
