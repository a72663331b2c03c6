"""Elasticsearch stopped under load: the other projections stay current, search catches up."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.stack import StackManager
from engine.stack.process import running
from projections.orders import APP
from tests.integration.read.expected import (
    assert_postgres_and_redis_match,
    assert_projections_match,
    eventually,
)
from tests.integration.read.scenario import populate


async def test_elasticsearch_down_holds_back_only_search(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    manager = StackManager(settings_for_test, lambda _line: None)
    if running(manager.layout.pid_file("elasticsearch")) is None:
        pytest.skip("Elasticsearch is not run by the native local stack here; cannot stop it")
    settings = settings_for_test.model_copy(
        update={
            "runner": settings_for_test.runner.model_copy(
                update={"batch_size": 20, "lane_queue_batches": 2, "backoff_max_s": 1.0}
            )
        }
    )
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    search = next(lane for lane in runner.lanes if lane.name == "order_search")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await populate(bus, orders=10, seed=3)
        await relay.drain()
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )

        await asyncio.to_thread(manager.down, ["elasticsearch"])
        try:
            await populate(bus, orders=40, seed=4)
            await relay.drain()
            # Postgres and Redis keep up while search cannot write at all.
            await eventually(
                lambda: assert_postgres_and_redis_match(settings, pool, resources.redis),
                timeout_s=60,
            )
            assert search.failing is not None
            assert search.detached, "search should have fallen behind and been detached"
        finally:
            await asyncio.to_thread(manager.up, ["elasticsearch"])
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=120,
        )
        assert not search.detached
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
