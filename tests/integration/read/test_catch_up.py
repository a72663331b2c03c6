"""A detached lane always catches up, whatever await a rebalance cancels its catch-up at.

The interleaving is built step by step: Elasticsearch is frozen (SIGSTOP) so
the search lane's batch in flight gets no answer; the lane is detached and its
catch-up parks on that batch (``lane.queue.join()``); a second daemon then
joins the group, and the rebalance cancels the parked catch-up. After
Elasticsearch resumes, search must reach the write model and the group's
committed offsets the end of the topic.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.runner import ProjectionRunner
from projections.orders import APP
from tests.integration.read.expected import assert_projections_match, eventually
from tests.integration.read.faults import (
    assert_committed_to_the_end,
    failures_of,
    fast_detaching,
    frozen_elasticsearch,
    wait_for,
)
from tests.integration.read.scenario import populate


def _assigned(runner: ProjectionRunner) -> bool:
    consumer = runner._consumer
    return consumer is not None and bool(consumer.assignment())


@pytest.mark.timeout(240)
async def test_catch_up_cancelled_by_a_rebalance_while_parked_still_catches_up(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = fast_detaching(settings_for_test)
    opened = Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    first = build_runner(APP, opened)
    search = next(lane for lane in first.lanes if lane.name == "order_search")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop))]
    try:
        await populate(bus, orders=5, seed=21)
        await relay.drain()
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )

        async with frozen_elasticsearch(settings):
            await populate(bus, orders=15, seed=22)
            await relay.drain()
            # Detached, with its catch-up waiting for the batch Elasticsearch will not answer.
            await wait_for(
                lambda: search.detached and search.busy and "order_search" in first.catching_up,
                "search detached with its catch-up parked on the batch in flight",
                timeout_s=30,
            )
            second = build_runner(APP, opened)
            tasks.append(asyncio.create_task(second.run(stop)))
            await wait_for(
                lambda: _assigned(first) and _assigned(second),
                "the rebalance to give both daemons partitions",
                timeout_s=60,
            )
        await populate(bus, orders=5, seed=23)  # light load after the store is back
        await relay.drain()
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )
        await eventually(lambda: assert_committed_to_the_end(settings), timeout_s=30)
        assert not search.detached
    finally:
        stop.set()
        failures = await failures_of(tasks)
    assert not failures, failures
