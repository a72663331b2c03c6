"""Redelivery never double-applies: the same offsets consumed twice leave every store as it was."""

from __future__ import annotations

import asyncio

import asyncpg

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from projections.orders import APP
from tests.integration.read.expected import assert_projections_match
from tests.integration.read.scenario import populate


async def _snapshot(
    pool: asyncpg.Pool, resources: Resources, settings: Settings
) -> tuple[object, ...]:
    es = resources.elasticsearch
    alias = f"{settings.elasticsearch.index_prefix}-orders"
    await es.indices.refresh(index=alias)
    hits = (
        await es.search(index=alias, size=10_000, query={"match_all": {}}, seq_no_primary_term=True)
    )["hits"]["hits"]
    keys = sorted(
        [k async for k in resources.redis.scan_iter(match=f"{settings.redis.key_prefix}*")]
    )
    return (
        [tuple(r) for r in await pool.fetch("SELECT * FROM order_details ORDER BY id")],
        [
            tuple(r)
            for r in await pool.fetch("SELECT * FROM order_stats_daily ORDER BY day, status")
        ],
        [tuple(r) for r in await pool.fetch("SELECT * FROM customer_orders ORDER BY id")],
        [
            (k, await resources.redis.get(k))  # the generation pointer
            if k.endswith(":current")
            else (k, await resources.redis.hgetall(k))
            for k in keys
        ],
        sorted((h["_id"], h["_seq_no"], str(h["_source"])) for h in hits),
    )


async def test_consuming_the_same_offsets_twice_changes_nothing(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=25)
    await OutboxRelay(
        settings_for_test.postgres, settings_for_test.kafka, settings_for_test.relay
    ).drain()
    first = build_runner(APP, resources)
    await asyncio.wait_for(first.run(asyncio.Event(), until_caught_up=True), timeout=90)
    before = await _snapshot(pool, resources, settings_for_test)

    # A second consumer group starts from offset 0: every event is delivered again.
    again_settings = settings_for_test.model_copy(
        update={
            "runner": settings_for_test.runner.model_copy(
                update={"group_id": f"{settings_for_test.runner.group_id}-again"}
            )
        }
    )
    again = build_runner(
        APP, Resources(again_settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    await asyncio.wait_for(again.run(asyncio.Event(), until_caught_up=True), timeout=90)

    assert sum(lane.applied for lane in again.lanes) == 0
    assert await _snapshot(pool, resources, settings_for_test) == before
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )
