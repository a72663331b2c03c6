"""Dead letters are ordered per aggregate: later events of a dead-lettered aggregate are parked.

The scenario is a rolling deploy. An ``OrderShipped`` written by a newer
release (schema version 3, which this daemon does not know: the registry
raises ``UnknownEventError``) reaches the daemon as the order's version 2,
followed by the order's ``OrderDelivered`` (version 3). Folding version 3
over the hole would show a delivered order without a tracking number, and a
later replay of the letter would change nothing (its version is below the
stored one) while reporting success. Instead the order is parked: its
version 3 is recorded as a dead letter behind the first one, every other
aggregate flows on, and ``engine status`` lists the order as parked.

"Deploying the fix" is done honestly: the replay runs with an application
whose registry knows ``OrderShipped`` v3 (as the newer release would), a
model that is the current one with ``schema_version = 3`` and an upcaster
from v2 (the v3 payload here adds nothing the projections read). The bytes
of the letter are not touched.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from engine import CommandBus, OutboxRelay, Resources, Settings, codec
from engine.daemon import build_runner
from engine.dlq import replay
from engine.partitioning import partition_for
from engine.postgres.deadletters import DeadLetterStore
from engine.status import collect_status
from engine.stores.redis import RedisHashReader
from projections.orders import APP, ConfirmOrder
from projections.orders.wiring import quick_lookup_prefix, search_alias
from tests.helpers import consume, new_customer, new_order, new_product, run_engine, settings_env
from tests.integration.newer_release import NEXT
from tests.integration.read.envelopes import order_event
from tests.integration.read.faults import produce_to_topic


async def _relay(settings: Settings) -> None:
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()


async def _run_daemon(resources: Resources) -> None:
    runner = build_runner(APP, resources)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)


async def _ship_from_the_future_then_deliver(
    bus: CommandBus, settings: Settings
) -> tuple[str, str, list[bytes]]:
    """An order whose v2 (OrderShipped schema v3) this daemon cannot decode, then its v3."""
    customer, product = await new_customer(bus), await new_product(bus)
    order = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    await _relay(settings)
    values = [
        order_event(
            order, customer, "OrderShipped", 3, 2, tracking_number="TRK42", carrier="Owl Post"
        ),
        order_event(order, customer, "OrderDelivered", 1, 3),
    ]
    await produce_to_topic(settings, order, values)
    return order, customer, values


async def _details(pool: asyncpg.Pool, order: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT status, version, tracking_number, shipped_at, delivered_at"
        " FROM order_details WHERE id = $1",
        order,
    )
    assert row is not None
    return row


async def test_a_dead_lettered_event_parks_its_aggregate_until_replay_applies_it_in_order(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    order, _customer, values = await _ship_from_the_future_then_deliver(bus, settings_for_test)
    await _run_daemon(resources)

    # Not folded over the gap: the order waits at version 1, parked.
    row = await _details(pool, order)
    assert (row["status"], row["version"], row["tracking_number"]) == ("PENDING", 1, None)
    letters = await DeadLetterStore(pool).list()
    first = next(d for d in letters if d.parked_behind is None)
    assert (first.projection, first.value, first.aggregate_id) == ("*", values[0], order)
    assert "UnknownEventError" in first.error
    parked = [d for d in letters if d.parked_behind == first.id]
    assert parked and {d.value for d in parked} == {values[1]}
    assert {d.projection for d in parked} >= {"order_details", "order_quick_lookup"}

    status = await collect_status(settings_for_test, APP, resources)
    details = next(p for p in status.projections if p.name == "order_details")
    assert details.parked_aggregates == 1 and not details.healthy
    assert [(p.aggregate_id, p.first_letter) for p in details.parked] == [(order, first.id)]
    assert "UnknownEventError" in details.parked[0].reason

    # The old code cannot apply it: it says so and applies nothing after it.
    outcome = await replay(first, APP, resources)
    assert not outcome.ok and "still does not decode" in outcome.detail
    assert (await _details(pool, order))["version"] == 1

    # The newer release is deployed: replay everything, from the first letter, in order.
    env = settings_env(settings_for_test)
    code, out, err = await run_engine(
        "dlq",
        "replay",
        "--all",
        env={**env, "ENGINE_APP": "tests.integration.newer_release:NEXT"},
    )
    assert code == 0, out + err
    row = await _details(pool, order)
    assert (row["status"], row["version"], row["tracking_number"]) == ("DELIVERED", 3, "TRK42")
    assert row["shipped_at"] is not None and row["delivered_at"] is not None
    quick = await RedisHashReader(resources.redis, quick_lookup_prefix(resources)).get(order)
    assert quick is not None and (quick[0]["status"], quick[1]) == ("DELIVERED", 3), quick
    alias = search_alias(resources)
    await resources.elasticsearch.indices.refresh(index=alias)
    found = await resources.elasticsearch.search(index=alias, query={"term": {"order_id": order}})
    assert [h["_source"]["status"] for h in found["hits"]["hits"]] == ["DELIVERED"]

    assert await DeadLetterStore(pool).list() == []
    assert await pool.fetchval("SELECT count(*) FROM engine_parked") == 0
    status = await collect_status(settings_for_test, APP, resources)
    assert all(p.parked_aggregates == 0 for p in status.projections)

    # Nothing is left, and replaying the same letter again applies nothing: it says so.
    code, out, err = await run_engine(
        "dlq",
        "replay",
        "--all",
        env={**env, "ENGINE_APP": "tests.integration.newer_release:NEXT"},
    )
    assert code == 0 and "nothing to replay" in (out + err).lower(), out + err

    # Events after the replay flow again (the aggregate is unparked).
    await produce_to_topic(
        settings_for_test,
        order,
        [order_event(order, _customer, "OrderDelivered", 1, 4)],
    )
    await _run_daemon(resources)
    assert (await _details(pool, order))["version"] == 4
    assert await DeadLetterStore(pool).list() == []


async def test_other_aggregates_on_the_same_partition_keep_flowing_while_one_is_parked(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    partitions = settings_for_test.kafka.partitions
    order, _customer, _values = await _ship_from_the_future_then_deliver(bus, settings_for_test)
    customer, product = await new_customer(bus, "Grace Hopper"), await new_product(bus)
    neighbour = order
    while neighbour == order or partition_for(neighbour, partitions) != partition_for(
        order, partitions
    ):
        neighbour = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    await bus.execute(ConfirmOrder(order_id=uuid.UUID(neighbour)))  # after A's parked events
    await _relay(settings_for_test)
    await _run_daemon(resources)

    row = await _details(pool, neighbour)
    assert (row["status"], row["version"]) == ("CONFIRMED", 2)
    assert (await _details(pool, order))["version"] == 1
    parked = await pool.fetch("SELECT projection, aggregate_id FROM engine_parked")
    assert [(r["projection"], r["aggregate_id"]) for r in parked] == [("*", order)]


async def test_a_replay_that_changes_nothing_says_so_and_is_not_marked_done(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    """A letter the stores already hold (here: a re-sent OrderCreated) is not reported as done."""
    customer, product = await new_customer(bus), await new_product(bus)
    await new_order(bus, customer, [(product, 1)])
    await _relay(settings_for_test)
    await _run_daemon(resources)
    envelopes = await consume(settings_for_test.kafka, 3)
    created = next(e for e in envelopes if e.event_type == "OrderCreated")
    await pool.execute(
        'INSERT INTO engine_dead_letters (projection, topic, partition, "offset", value, headers,'
        " event_type, error, attempts) VALUES ('order_details', 't', 0, 1, $1, '{}',"
        " 'OrderCreated', 'ValueError: boom', 3)",
        codec.encode(created).value,
    )
    letter = (await DeadLetterStore(pool).list())[0]
    outcome = await replay(letter, APP, resources)
    assert not outcome.ok and "applied nothing" in outcome.detail, outcome.detail
    assert [d.id for d in await DeadLetterStore(pool).list()] == [letter.id]


async def test_an_event_arriving_while_its_aggregate_is_replayed_waits_and_is_not_lost(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    """The exact interleaving: a replay holds the park row while a lane meets the next event.

    The replay is held inside its transaction by a trigger on the details table
    that waits for an advisory lock the test holds. Meanwhile the daemon reads
    the order's version 4: its lanes must wait for the replay (on the park
    row), then find the order unparked and apply version 4 themselves, after
    the replayed versions 2 and 3. Parking it behind the finished replay would
    lose it; applying it without waiting would fold it over the hole.
    """
    order, customer, _values = await _ship_from_the_future_then_deliver(bus, settings_for_test)
    await _run_daemon(resources)
    first = next(d for d in await DeadLetterStore(pool).list() if d.parked_behind is None)
    table = await pool.fetchval(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE 'order\\_details\\_g%'"
    )
    await pool.execute(
        "CREATE FUNCTION test_hold_replay() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_advisory_xact_lock_shared(424242); RETURN NEW; END $$"
    )
    await pool.execute(
        f"CREATE TRIGGER test_hold_replay BEFORE INSERT OR UPDATE ON {table}"
        " FOR EACH ROW EXECUTE FUNCTION test_hold_replay()"
    )
    holder = await asyncpg.connect(settings_for_test.postgres.dsn())
    try:
        await holder.execute("SELECT pg_advisory_lock(424242)")
        replaying = asyncio.create_task(replay(first, NEXT, resources))
        await _until(
            holder, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        await produce_to_topic(
            settings_for_test, order, [order_event(order, customer, "OrderDelivered", 1, 4)]
        )
        daemon = asyncio.create_task(_run_daemon(resources))
        # A lane waits on the park row the replay holds.
        await _until(
            holder,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%engine_parked%'",
        )
        await holder.execute("SELECT pg_advisory_unlock(424242)")
        outcome = await asyncio.wait_for(replaying, timeout=60)
        await asyncio.wait_for(daemon, timeout=90)
    finally:
        await holder.close()
        await pool.execute(f"DROP TRIGGER IF EXISTS test_hold_replay ON {table}")
        await pool.execute("DROP FUNCTION IF EXISTS test_hold_replay()")

    assert outcome.ok, outcome.detail
    row = await _details(pool, order)
    assert (row["version"], row["tracking_number"]) == (4, "TRK42")
    assert await DeadLetterStore(pool).list() == []
    assert await pool.fetchval("SELECT count(*) FROM engine_parked") == 0
    # Version 4 was applied by the lanes, never parked behind the finished replay.
    assert (
        await pool.fetchval("SELECT count(*) FROM engine_dead_letters WHERE aggregate_version = 4")
        == 0
    )


async def _until(conn: asyncpg.Connection, count_query: str, timeout_s: float = 60.0) -> None:
    """Poll ``count_query`` until it counts at least one row (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await conn.fetchval(count_query):
        assert loop.time() < deadline, f"timed out waiting for: {count_query}"
        await asyncio.sleep(0.05)
