"""A store that stops answering is detached within ``stall_timeout_s``; a busy one is not.

Elasticsearch is frozen with SIGSTOP, not stopped: its sockets stay open and
every request simply gets no answer, which is what a hung store (GC pause, VM
freeze, a wedged disk) looks like to the daemon. A stopped store answers at
once with "connection refused" and is a different, easier case
(test_store_outage.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.consistency import ConsistencyGate, ConsistencyToken
from engine.daemon import build_runner
from engine.projection import Projected
from engine.stores.redis import RedisHashStore
from projections.orders import APP, ConfirmOrder
from tests.helpers import new_customer, new_order, new_product
from tests.integration.read.expected import assert_projections_match, eventually
from tests.integration.read.faults import failures_of, frozen_elasticsearch
from tests.integration.read.scenario import populate

# Everything but search: Postgres views and the Redis quick lookup.
NOT_SEARCH = ["customer_orders", "order_details", "order_quick_lookup", "order_stats"]
STALL_S = 2.0
# How long a write may take to reach the other projections while search hangs: the
# stall bound, plus a batch, the relay's publish and the gate's polling.
BOUND_S = STALL_S + 3.0


def _runner_settings(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"runner": settings.runner.model_copy(update=changes)})


@pytest.mark.timeout(180)
async def test_a_frozen_store_holds_the_others_back_at_most_the_stall_bound(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = _runner_settings(
        settings_for_test,
        batch_size=20,
        lane_queue_batches=2,
        stall_timeout_s=STALL_S,
        backoff_max_s=1.0,
    )
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    search = next(lane for lane in runner.lanes if lane.name == "order_search")
    gate = ConsistencyGate(pool, settings.kafka.topic, timeout_s=BOUND_S)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
    try:
        await populate(bus, orders=3, seed=31)
        customer, product = await new_customer(bus), await new_product(bus)
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )

        lags: list[float] = []
        loop = asyncio.get_running_loop()
        async with frozen_elasticsearch(settings):
            frozen_until = loop.time() + 20
            while loop.time() < frozen_until:
                created = await new_order(bus, customer, [(product, 1)])
                order_id = uuid.UUID(created.aggregate_id)
                confirmed = await bus.execute(ConfirmOrder(order_id=order_id))
                token = ConsistencyToken.of(confirmed, settings.kafka.partitions)
                started = loop.time()
                # NotYetConsistentError here: the frozen store held the others past the bound.
                await gate.wait(NOT_SEARCH, token)
                lags.append(loop.time() - started)
            assert search.detached, "search got no answer for 20s and was never detached"
        assert len(lags) > 10 and max(lags) <= BOUND_S, lags

        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )
        assert not search.detached
    finally:
        stop.set()
        failures = await failures_of(tasks)
    assert not failures, failures


@pytest.mark.timeout(180)
async def test_a_busy_store_that_keeps_answering_gets_back_pressure_not_a_detach(
    bus: CommandBus,
    settings_for_test: Settings,
    resources: Resources,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _runner_settings(
        settings_for_test, batch_size=5, lane_queue_batches=1, stall_timeout_s=1.5
    )
    # Fault injection around the real Redis store: every batch takes 0.6s, well inside
    # the stall bound, so the store is busy (slow) but never silent.
    real_apply = RedisHashStore.apply

    async def slow_apply(self: RedisHashStore, items: Sequence[Projected]) -> int:
        await asyncio.sleep(0.6)
        return await real_apply(self, items)

    monkeypatch.setattr(RedisHashStore, "apply", slow_apply)
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    quick = next(lane for lane in runner.lanes if lane.name == "order_quick_lookup")
    held: list[bool] = []
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await populate(bus, orders=12, seed=32)
        await relay.drain()

        async def matching() -> None:
            held.append(quick.queue.full())
            await assert_projections_match(
                settings, resources.pool, resources.redis, resources.elasticsearch
            )

        await eventually(matching, timeout_s=120)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
    assert any(held), "the busy store never filled its queue: nothing was tested"
    detaches = [r.getMessage() for r in caplog.records if "catch up alone" in r.getMessage()]
    assert detaches == []
    assert not quick.detached
