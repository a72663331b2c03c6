"""A rebalance while one store hangs holds the group back at most the stall bound.

Before partitions move, a daemon flushes what its lanes were given and
commits. It used to wait for every lane for up to ``shutdown_timeout_s``
(20 s by default), so one frozen store stopped every projection of the whole
group for that long: the revoking daemon waits, and the group waits for it
(seen in the fault soak: no projection moved on any partition until Redis
thawed). Now a lane whose store has not answered for ``stall_timeout_s`` (or
answers with errors) is detached instead of waited for: it catches up alone
later, and the others move on.

The interleaving: daemon 1 runs with Redis frozen, its quick-lookup lane
stuck in a store call; daemon 2 joins the group, so daemon 1 must revoke its
partitions. ``shutdown_timeout_s`` is set far above the time Redis stays
frozen, so waiting for the frozen lane lasts until the group's session timeout
evicts daemon 1 (``session_timeout_s``, 10 s): the group then moves on without
it, and daemon 2 takes every partition. Instead, daemon 1 must hand over in
time and keep its share, and the group must go on with Redis still frozen.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from projections.orders import APP, ConfirmOrder
from tests.helpers import new_customer, new_order, new_product
from tests.integration.read.expected import assert_projections_match, eventually
from tests.integration.read.faults import failures_of, frozen, wait_for

FROZEN_S = 25.0


@pytest.mark.timeout(240)
async def test_a_rebalance_does_not_wait_for_a_lane_whose_store_hangs(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = settings_for_test.model_copy(
        update={
            "runner": settings_for_test.runner.model_copy(
                update={
                    "batch_size": 10,
                    "lane_queue_batches": 2,
                    "stall_timeout_s": 1.5,
                    "backoff_max_s": 0.5,
                    "shutdown_timeout_s": 4 * FROZEN_S,
                }
            )
        }
    )
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    daemon_resources = Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    first, second = build_runner(APP, daemon_resources), build_runner(APP, daemon_resources)
    quick = next(lane for lane in first.lanes if lane.name == "order_quick_lookup")
    stop_first, stop_second, stop_relay = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop_first)), asyncio.create_task(relay.run(stop_relay))]
    try:
        customer, product = await new_customer(bus), await new_product(bus)
        await new_order(bus, customer, [(product, 1)])
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )
        loop = asyncio.get_running_loop()
        async with frozen(settings, "redis"):
            thaw_at = loop.time() + FROZEN_S
            await new_order(bus, customer, [(product, 1)])
            await wait_for(lambda: quick.waiting_since is not None, "Redis to hang", 30)

            tasks.append(asyncio.create_task(second.run(stop_second)))
            await wait_for(
                lambda: second._consumer is not None and bool(second._consumer.assignment()),
                "the rebalance to complete with Redis frozen",
                FROZEN_S / 2,
            )
            # Before: daemon 1 sat in its revoke waiting for the frozen lane until the
            # session timeout evicted it, and daemon 2 got every partition alone.
            assert len(second._consumer.assignment()) < settings.kafka.partitions, (
                "the daemon with a frozen store was evicted instead of handing over"
            )
            after = (await new_order(bus, customer, [(product, 2)])).aggregate_id
            await bus.execute(ConfirmOrder(order_id=uuid.UUID(after)))

            async def confirmed() -> bool:
                status = await pool.fetchval(
                    "SELECT status FROM order_details WHERE id = $1", after
                )
                return bool(status == "CONFIRMED")

            while not await confirmed():  # and the group moves on while Redis is frozen
                assert loop.time() < thaw_at, "the frozen Redis lane held the group back"
                await asyncio.sleep(0.2)

        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=90,
        )
    finally:
        stop_first.set()
        stop_second.set()
        stop_relay.set()
        failures = await failures_of(tasks, timeout_s=4 * FROZEN_S + 30)
    assert not failures, failures
