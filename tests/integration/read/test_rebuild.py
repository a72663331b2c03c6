"""Rebuild while events keep arriving: readers switch atomically and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.rebuild import rebuild
from projections.orders import APP
from tests.helpers import free_port, run_engine, settings_env
from tests.integration.read.expected import assert_projections_match, eventually
from tests.integration.read.scenario import populate


async def _keep_writing(bus: CommandBus, stop: asyncio.Event) -> int:
    rounds = 0
    while not stop.is_set():
        await populate(bus, orders=2, seed=100 + rounds)
        rounds += 1
        await asyncio.sleep(0.05)
    return rounds


async def test_rebuild_while_events_keep_arriving(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=20, seed=21)
    stop_all = asyncio.Event()
    relay = OutboxRelay(
        settings_for_test.postgres,
        settings_for_test.kafka,
        settings_for_test.relay.model_copy(update={"poll_interval_s": 0.2}),
    )
    runner = build_runner(APP, resources)
    background = [
        asyncio.create_task(relay.run(stop_all)),
        asyncio.create_task(runner.run(stop_all)),
    ]
    stop_writing = asyncio.Event()
    writer = asyncio.create_task(_keep_writing(bus, stop_writing))
    try:
        progress: list[tuple[int, int]] = []
        for name in ("order_details", "order_quick_lookup", "order_search", "order_stats"):
            report = await rebuild(APP, resources, name, lambda d, t: progress.append((d, t)))
            assert (report.old_generation, report.new_generation) == (1, 2)
            assert report.replayed > 0
        assert progress and progress[-1][0] == progress[-1][1]
        stop_writing.set()
        assert await writer > 0, "events must have kept arriving during the rebuilds"
        await eventually(
            lambda: assert_projections_match(
                settings_for_test, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=90,
        )
    finally:
        stop_writing.set()
        with contextlib.suppress(Exception):
            await writer
        stop_all.set()
        await asyncio.wait_for(asyncio.gather(*background), timeout=60)
    generations = dict(
        await pool.fetch("SELECT projection, generation FROM engine_projection_generations")
    )
    assert generations == {
        "order_details": 2,
        "order_quick_lookup": 2,
        "order_search": 2,
        "order_stats": 2,
    }
    # The old generations are gone.
    assert await pool.fetchval("SELECT to_regclass('order_details_g1')") is None
    assert not (
        await resources.elasticsearch.indices.exists(
            index=f"{settings_for_test.elasticsearch.index_prefix}-orders-v1"
        )
    )


async def test_rebuild_refills_a_redis_that_lost_its_data(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=15, seed=31)
    await OutboxRelay(
        settings_for_test.postgres, settings_for_test.kafka, settings_for_test.relay
    ).drain()
    await asyncio.wait_for(
        build_runner(APP, resources).run(asyncio.Event(), until_caught_up=True), timeout=90
    )
    keys = [
        k async for k in resources.redis.scan_iter(match=f"{settings_for_test.redis.key_prefix}*")
    ]
    await resources.redis.delete(*keys)  # Redis lost everything

    code, out, err = await run_engine(
        "rebuild", "order_quick_lookup", env=settings_env(settings_for_test)
    )
    assert code == 0, err
    assert "generation 1 -> 2" in out
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )


async def test_rebuild_of_an_unknown_projection_is_refused(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    env = settings_env(settings_for_test)
    code, _, err = await run_engine("rebuild", "nope", env=env)
    assert code == 3 and "no projection named 'nope'" in err


async def test_rebuild_records_the_topics_end_and_holds_without_kafka(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for_test
    await populate(bus, orders=5, seed=33)
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await probe.start()
    try:
        partitions = [TopicPartition(settings.kafka.topic, p) for p in range(3)]
        ends = {tp.partition: end for tp, end in (await probe.end_offsets(partitions)).items()}
    finally:
        await probe.stop()
    assert sum(ends.values()) > 0

    # The switch raises the projection's progress to the topic's end: everything below it
    # is in the new generation (what lets a projection stranded by retention go on).
    await rebuild(APP, resources, "order_details", lambda done, total: None)
    rows = await pool.fetch(
        "SELECT partition, next_offset FROM engine_partition_progress WHERE projection = $1",
        "order_details",
    )
    assert {row["partition"]: row["next_offset"] for row in rows} == ends

    # Kafka out of reach (nothing listens there): the rebuild still holds, and says what
    # it skipped.
    away = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}
            )
        }
    )
    with caplog.at_level(logging.WARNING, logger="engine.rebuild"):
        report = await rebuild(
            APP,
            Resources(away, resources.pool, resources.redis, resources.elasticsearch),
            "order_details",
            lambda done, total: None,
        )
    assert report.new_generation == 3
    assert "Kafka is out of reach" in caplog.text
    assert await pool.fetchval("SELECT count(*) FROM order_details") == 5
