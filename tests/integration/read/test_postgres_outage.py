"""A Postgres outage pauses what needs Postgres and nothing else.

The daemon reaches Postgres through a proxy the test cuts (connections reset,
then refused: what a stopped server looks like), while commands and the
relay use Postgres directly. So during the "outage" events keep arriving in
Kafka, and:

- the Redis and Elasticsearch projections stay current (they apply without
  the generation fence and the dead-letter look-up, *unconfirmed*);
- the Postgres projections wait;
- nothing is committed to Kafka past unconfirmed work, and no checkpoint
  claims it, so a consistency token cannot pass on it;
- when Postgres returns everything converges, progress records catch up, and
  nothing is lost or doubled (each store compared field by field, versions
  included, with the write model).

The second test is the interleaving that threatens unconfirmed writes: a
rebuild that switches the search projection to a new generation while the
daemon, cut off, is still writing the old one. Once Postgres is back the
daemon must find the switch and apply its unconfirmed events again to the new
generation; otherwise the new generation misses every event the daemon
applied after the rebuild's last read of the log.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine import CommandBus, OutboxRelay, Resources, Settings, create_pool
from engine.daemon import build_runner
from engine.rebuild import rebuild
from projections.orders import APP, ConfirmOrder
from tests.helpers import new_customer, new_order, new_product
from tests.integration.read.expected import (
    _check_quick_lookup,
    _check_search,
    assert_projections_match,
    eventually,
    write_model_orders,
)
from tests.integration.read.faults import assert_committed_to_the_end, failures_of
from tests.integration.read.proxy import CuttableProxy, proxy_to
from tests.integration.read.scenario import populate

NOT_POSTGRES = ("order_quick_lookup", "order_search")


def _through(settings: Settings, port: int) -> Settings:
    """The daemon's settings: Postgres through the proxy, short backoff and batches."""
    return settings.model_copy(
        update={
            "postgres": settings.postgres.model_copy(update={"host": "127.0.0.1", "port": port}),
            "runner": settings.runner.model_copy(
                update={"batch_size": 20, "backoff_max_s": 0.5, "stall_timeout_s": 2.0}
            ),
        }
    )


async def _end_offsets(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)]
        return {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def _recorded(pool: asyncpg.Pool, projection: str) -> dict[int, int]:
    rows = await pool.fetch(
        "SELECT partition, next_offset FROM engine_partition_progress WHERE projection = $1",
        projection,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def _write_orders(bus: CommandBus, count: int) -> list[str]:
    customer, product = await new_customer(bus), await new_product(bus)
    ids = []
    for _ in range(count):
        created = await new_order(bus, customer, [(product, 2)])
        await bus.execute(ConfirmOrder(order_id=uuid.UUID(created.aggregate_id)))
        ids.append(created.aggregate_id)
    return ids


async def _redis_and_search_current(settings: Settings, pool: asyncpg.Pool, res: Resources) -> None:
    orders = await write_model_orders(pool)
    await _check_quick_lookup(settings, res.redis, orders)
    await _check_search(settings, res.elasticsearch, orders)


@asynccontextmanager
async def _daemon_behind_a_proxy(
    bus: CommandBus, pool: asyncpg.Pool, settings: Settings, resources: Resources, orders: int
) -> AsyncIterator[CuttableProxy]:
    """A daemon (and a relay) running, caught up on ``orders`` orders, its Postgres a proxy.

    On the way out it is stopped, and must end without an error.
    """
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    async with proxy_to(settings.postgres.host, settings.postgres.port) as proxy:
        daemon_settings = _through(settings, proxy.port)
        daemon_pool = await create_pool(daemon_settings.postgres)
        runner = build_runner(
            APP, Resources(daemon_settings, daemon_pool, resources.redis, resources.elasticsearch)
        )
        stop = asyncio.Event()
        tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
        try:
            await populate(bus, orders=orders, seed=orders)
            await _all_current(settings, pool, resources)
            yield proxy
        finally:
            stop.set()
            failures = await failures_of(tasks)
            await daemon_pool.close()
    assert not failures, failures


async def _all_current(settings: Settings, pool: asyncpg.Pool, resources: Resources) -> None:
    await eventually(
        lambda: assert_projections_match(settings, pool, resources.redis, resources.elasticsearch),
        timeout_s=60,
    )


@pytest.mark.timeout(240)
async def test_redis_and_search_stay_current_while_postgres_is_down(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = settings_for_test
    async with _daemon_behind_a_proxy(bus, pool, settings, resources, orders=4) as proxy:
        await proxy.cut()
        during = await _write_orders(bus, 12)
        # Before: every lane waited for Postgres (dead-letter look-up, fence), so
        # this timed out with Redis and search as stale as the Postgres views.
        await eventually(lambda: _redis_and_search_current(settings, pool, resources), 30)
        details = {str(r["id"]) for r in await pool.fetch("SELECT id FROM order_details")}
        assert not details & set(during), "the Postgres projection wrote through a cut"
        # Unconfirmed work is claimed nowhere: no checkpoint, no commit past it.
        ends = await _end_offsets(settings)
        for projection in NOT_POSTGRES:
            recorded = await _recorded(pool, projection)
            assert recorded != ends, f"{projection} recorded progress through a cut"

        await proxy.restore()
        await _all_current(settings, pool, resources)

        async def caught_up() -> None:
            await assert_committed_to_the_end(settings)
            for projection in NOT_POSTGRES:
                assert await _recorded(pool, projection) == await _end_offsets(settings)

        await eventually(caught_up, timeout_s=30)
        assert not await pool.fetchval("SELECT count(*) FROM engine_dead_letters")


@pytest.mark.timeout(240)
async def test_unconfirmed_writes_are_applied_again_after_a_rebuild_switched_meanwhile(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = settings_for_test
    async with _daemon_behind_a_proxy(bus, pool, settings, resources, orders=3) as proxy:
        await proxy.cut()
        await _write_orders(bus, 3)
        await eventually(lambda: _redis_and_search_current(settings, pool, resources), 30)

        # The rebuild reaches Postgres; the daemon does not, and holds no fence.
        report = await rebuild(APP, resources, "order_search", lambda done, total: None)
        assert report.new_generation == report.old_generation + 1
        # Applied by the cut-off daemon to the retired generation only.
        after_switch = await _write_orders(bus, 4)
        old_index = f"{settings.elasticsearch.index_prefix}-orders-v{report.old_generation}"

        async def in_the_retired_generation() -> None:
            await resources.elasticsearch.indices.refresh(index=old_index)
            found = await resources.elasticsearch.search(
                index=old_index, query={"ids": {"values": after_switch}}, size=100
            )
            assert len(found["hits"]["hits"]) == len(after_switch)

        await eventually(in_the_retired_generation, timeout_s=30)
        await proxy.restore()
        # Before: the new generation (which readers use) never got these orders.
        await _all_current(settings, pool, resources)
