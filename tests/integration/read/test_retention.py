"""Offsets the daemon cannot have: deleted by retention, or refused by a rebalance.

Retention is made deterministic with ``delete_records``: it moves a partition's
log start exactly where the test says, which is what time- or size-based
retention does on its own schedule.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import CommitFailedError

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.errors import ConfigurationError
from engine.rebuild import rebuild
from engine.topics import ensure_topic
from projections.orders import APP
from tests.integration.read.expected import (
    assert_postgres_and_redis_match,
    assert_projections_match,
    eventually,
)
from tests.integration.read.faults import (
    assert_committed_to_the_end,
    fast_detaching,
    frozen_elasticsearch,
    wait_for,
)
from tests.integration.read.scenario import populate


async def delete_everything_published(settings: Settings) -> None:
    """Move every partition's log start to its end, as retention would, given time."""
    partitions = [TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)]
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await probe.start()
    try:
        ends = await probe.end_offsets(partitions)
    finally:
        await probe.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(end) for tp, end in ends.items()})
    finally:
        await admin.close()


@pytest.mark.timeout(180)
async def test_a_lane_the_retention_overtook_stops_and_says_to_rebuild(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = fast_detaching(settings_for_test)
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    search = next(lane for lane in runner.lanes if lane.name == "order_search")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await populate(bus, orders=3, seed=41)
        await relay.drain()
        await eventually(
            lambda: assert_projections_match(
                settings, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )
        async with frozen_elasticsearch(settings):
            await populate(bus, orders=10, seed=42)
            await relay.drain()
            await wait_for(lambda: search.detached, "search to be detached", timeout_s=30)
            # What search has not applied yet is gone before its catch-up can read it.
            await delete_everything_published(settings)
        await wait_for(
            lambda: "engine rebuild order_search" in (search.failing or ""),
            "search to stop and say that it needs a rebuild (not to jump past the gap)",
            timeout_s=30,
        )
        assert "partition" in (search.failing or "")
        assert search.detached

        async def recorded() -> None:
            # The lane says so first, then records it: read until the row has it.
            last_error = await pool.fetchval(
                "SELECT last_error FROM engine_projection_checkpoints WHERE projection = $1",
                "order_search",
            )
            assert "engine rebuild order_search" in (last_error or ""), last_error

        await eventually(recorded, timeout_s=30)

        # The other projections go on.
        await populate(bus, orders=3, seed=43)
        await relay.drain()
        await eventually(
            lambda: assert_postgres_and_redis_match(settings, pool, resources.redis),
            timeout_s=60,
        )
        assert search.detached
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


@pytest.mark.timeout(120)
async def test_a_commit_refused_by_a_rebalance_is_carried_by_the_next_one(
    bus: CommandBus,
    settings_for_test: Settings,
    resources: Resources,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for_test
    await ensure_topic(settings.kafka)  # so the daemon's consumer starts at once
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(APP, resources)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_for(lambda: runner._consumer is not None, "the consumer", timeout_s=30)
        consumer = runner._consumer
        assert consumer is not None
        real_commit = consumer.commit
        refused: list[object] = []

        # Fault injection: the group refuses the first commit, as it does when a
        # rebalance started between the fetch and the commit.
        async def commit_refused_once(offsets: Any = None) -> None:
            if not refused:
                refused.append(offsets)
                raise CommitFailedError("the group has rebalanced")
            await real_commit(offsets)

        monkeypatch.setattr(consumer, "commit", commit_refused_once)
        await populate(bus, orders=3, seed=44)
        await relay.drain()
        await eventually(
            lambda: assert_projections_match(
                settings, resources.pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=60,
        )
        await eventually(lambda: assert_committed_to_the_end(settings), timeout_s=30)
        assert refused, "no commit was refused: nothing was tested"
        assert not task.done(), "the daemon ended on a refused commit"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "group",
    [
        "kept",  # the group's committed offsets are below the log's start
        # None at all: a new group id, as when Kafka expired the offsets of a group that had
        # no member for offsets.retention.minutes (7 days by default).
        "forgotten",
    ],
)
async def test_a_daemon_restarted_after_the_retention_overtook_its_group_says_to_rebuild(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    group: str,
) -> None:
    settings = settings_for_test
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    await populate(bus, orders=3, seed=45)
    await relay.drain()
    # Burst mode: applies what is there, commits, and stops.
    await asyncio.wait_for(
        build_runner(APP, resources).run(asyncio.Event(), until_caught_up=True), 60
    )
    await eventually(
        lambda: assert_projections_match(settings, pool, resources.redis, resources.elasticsearch),
        timeout_s=30,
    )

    # Every daemon is down while events are published and the retention deletes them.
    await populate(bus, orders=10, seed=46)
    await relay.drain()
    await delete_everything_published(settings)
    await populate(bus, orders=3, seed=47)
    await relay.drain()
    if group == "forgotten":
        runner_settings = settings.runner.model_copy(update={"group_id": f"{uuid.uuid4()}"})
        settings = settings.model_copy(update={"runner": runner_settings})
        resources = Resources(settings, resources.pool, resources.redis, resources.elasticsearch)

    # Restarted, the daemon does not go on past the hole (it used to: 16 orders written,
    # 6 in order_details, and "caught up"): every projection is stranded, and says so.
    runner = build_runner(APP, resources)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        everyone = {lane.name for lane in runner.lanes}
        await wait_for(lambda: set(runner.stranded) == everyone, "every lane stranded", 30)
        assert all("group's committed offset" in r for r in runner.stranded.values())
        assert all(lane.detached for lane in runner.lanes)

        async def recorded() -> None:
            rows = await pool.fetch("SELECT last_error FROM engine_projection_checkpoints")
            assert len(rows) == len(everyone), rows
            assert all("engine rebuild" in (row["last_error"] or "") for row in rows), rows

        await eventually(recorded, timeout_s=30)
        # Nothing past the hole was applied: not even the 3 orders after it.
        assert await pool.fetchval("SELECT count(*) FROM order_details") == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
    # Burst mode cannot be caught up past the hole either: it ends saying to rebuild.
    with pytest.raises(ConfigurationError, match="engine rebuild"):
        await asyncio.wait_for(
            build_runner(APP, resources).run(asyncio.Event(), until_caught_up=True), 60
        )

    # The way out it names: rebuild each one from the event log, then restart.
    for lane in runner.lanes:
        await rebuild(APP, resources, lane.name, lambda done, total: None)
    await asyncio.wait_for(
        build_runner(APP, resources).run(asyncio.Event(), until_caught_up=True), 60
    )
    await eventually(
        lambda: assert_projections_match(settings, pool, resources.redis, resources.elasticsearch),
        timeout_s=30,
    )
    assert await pool.fetchval("SELECT count(*) FROM order_details") == 16
