"""A version jump is a gap: parked and reported like a dead letter, never folded over.

An order's ``OrderDelivered`` (version 3) is produced straight to the topic
while its ``OrderShipped`` (version 2) is missing from it. Folded, the order
would show DELIVERED with no tracking number, and the shipment arriving later
would be skipped as already applied. Instead the daemon dead-letters version
3 (``VersionGapError``, for every projection), parks the order, and ``engine
status`` lists it; when the missing version 2 turns up it is applied (it is
below the park); ``engine dlq replay --all`` then applies version 3 on top.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from engine.status import collect_status
from engine.stores.redis import RedisHashReader
from projections.orders import APP
from projections.orders.wiring import quick_lookup_prefix
from tests.helpers import new_customer, new_order, new_product, run_engine, settings_env
from tests.integration.read.envelopes import order_event
from tests.integration.read.expected import eventually
from tests.integration.read.faults import assert_committed_to_the_end, produce_to_topic


async def _caught_up(settings: Settings, pool: asyncpg.Pool) -> None:
    """Wait until the running daemon committed everything on the topic."""
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    await eventually(lambda: assert_committed_to_the_end(settings), timeout_s=60)


async def _details(pool: asyncpg.Pool, order: str) -> tuple[str, int, str | None]:
    row = await pool.fetchrow(
        "SELECT status, version, tracking_number FROM order_details WHERE id = $1", order
    )
    assert row is not None
    return row["status"], row["version"], row["tracking_number"]


@pytest.mark.timeout(180)
async def test_a_version_jump_parks_the_aggregate_until_the_gap_is_filled_and_replayed(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = settings_for_test
    customer, product = await new_customer(bus), await new_product(bus)
    order = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    other = (await new_order(bus, customer, [(product, 2)])).aggregate_id
    # One daemon all along: it has seen version 1 when version 3 arrives.
    stop = asyncio.Event()
    daemon = asyncio.create_task(build_runner(APP, resources).run(stop))
    try:
        await _caught_up(settings, pool)
        delivered = order_event(order, customer, "OrderDelivered", 1, 3)
        await produce_to_topic(settings, order, [delivered])
        await _caught_up(settings, pool)
        await _check_parked_then_filled(
            settings, pool, resources, order=order, other=other, delivered=delivered
        )
    finally:
        stop.set()
        await asyncio.wait_for(daemon, timeout=60)


async def _check_parked_then_filled(
    settings: Settings,
    pool: asyncpg.Pool,
    resources: Resources,
    *,
    order: str,
    other: str,
    delivered: bytes,
) -> None:
    customer = str(await pool.fetchval("SELECT customer_id FROM orders WHERE id = $1", order))
    # Before: ("DELIVERED", 3, None), a state that never existed.
    assert await _details(pool, order) == ("PENDING", 1, None)
    quick = await RedisHashReader(resources.redis, quick_lookup_prefix(resources)).get(order)
    assert quick is not None and quick[1] == 1, quick
    assert (await _details(pool, other))[1] == 1  # the others flow on
    letters = await DeadLetterStore(pool).list()
    assert [(d.projection, d.aggregate_version, d.value) for d in letters] == [("*", 3, delivered)]
    assert "VersionGapError" in letters[0].error and "version 2 missing" in letters[0].error
    status = await collect_status(settings, APP, resources)
    for projection in status.projections:
        assert [p.aggregate_id for p in projection.parked] == [order], projection.name
        assert "version 2 missing" in projection.parked[0].reason

    # Delivered again (a restart, or a catch-up that decodes it fine): still parked.
    first = letters[0]
    again = NewDeadLetter(
        projection="order_details",
        topic=first.topic,
        partition=first.partition,
        offset=first.offset,
        key=first.key,
        value=first.value,
        headers=first.headers,
        event_type=first.event_type,
        error="parked",
        attempts=0,
        aggregate_id=order,
        aggregate_version=3,
    )
    parking = await DeadLetterStore(pool).park_behind([again])
    assert parking.held == {(first.partition, first.offset)} and parking.parked == {order}

    # The missing shipment turns up: below the park, it is applied.
    shipped = order_event(
        order, customer, "OrderShipped", 2, 2, tracking_number="TRK7", carrier="Owl Post"
    )
    await produce_to_topic(settings, order, [shipped])
    await _caught_up(settings, pool)
    assert await _details(pool, order) == ("SHIPPED", 2, "TRK7")

    code, out, err = await run_engine("dlq", "replay", "--all", env=settings_env(settings))
    assert code == 0, out + err
    assert await _details(pool, order) == ("DELIVERED", 3, "TRK7")
    assert await pool.fetchval("SELECT count(*) FROM engine_parked") == 0
