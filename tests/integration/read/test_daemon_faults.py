"""The daemon as a process: kill -9 mid-batch, SIGTERM, and two daemons sharing a group."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine import CommandBus, OutboxRelay, Resources, Settings
from tests.helpers import run_engine, settings_env, start_engine
from tests.integration.read.expected import assert_projections_match, eventually
from tests.integration.read.scenario import populate


async def _applied(pool: asyncpg.Pool) -> int:
    value = await pool.fetchval(
        "SELECT coalesce(sum(applied), 0) FROM engine_projection_checkpoints"
    )
    return int(value)


async def _relay(settings: Settings) -> None:
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()


async def test_daemon_killed_mid_batch_restarts_to_the_exact_state(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=60, seed=11)
    await _relay(settings_for_test)
    total_events = await pool.fetchval("SELECT count(*) FROM engine_event_log")
    env = {**settings_env(settings_for_test), "ENGINE_RUNNER__BATCH_SIZE": "3"}
    daemon = await start_engine("run", "--log-level", "warning", env=env)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await _applied(pool) == 0:
            assert loop.time() < deadline, "the daemon never applied anything"
            await asyncio.sleep(0.02)
    finally:
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait()
    assert await _applied(pool) < total_events * 5, "the kill must land before the end"

    code, _, err = await run_engine(
        "run", "--until-caught-up", "--log-level", "warning", env=env, timeout_s=100
    )
    assert code == 0, err
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )


async def test_sigterm_commits_and_exits_zero(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=15, seed=12)
    await _relay(settings_for_test)
    daemon = await start_engine(
        "run", "--log-level", "warning", env=settings_env(settings_for_test)
    )
    await eventually(
        lambda: assert_projections_match(
            settings_for_test, pool, resources.redis, resources.elasticsearch
        ),
        timeout_s=60,
    )
    daemon.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.wait(), timeout=30) == 0

    # Everything was committed: a restart would have nothing to redo.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings_for_test.kafka.bootstrap_servers,
        group_id=settings_for_test.runner.group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings_for_test.kafka.topic, p)
            for p in range(settings_for_test.kafka.partitions)
        ]
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            assert (await consumer.committed(tp) or 0) == ends[tp]
    finally:
        await consumer.stop()


async def test_two_daemons_share_the_work_and_survive_one_being_killed(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    env = settings_env(settings_for_test)
    first = await start_engine("run", "--log-level", "warning", env=env)
    second = await start_engine("run", "--log-level", "warning", env=env)
    try:
        await populate(bus, orders=20, seed=13)
        await _relay(settings_for_test)
        await eventually(
            lambda: assert_projections_match(
                settings_for_test, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=90,
        )
        first.send_signal(signal.SIGKILL)
        await first.wait()
        # The survivor takes the dead daemon's partitions once the group notices.
        await populate(bus, orders=20, seed=14)
        await _relay(settings_for_test)
        await eventually(
            lambda: assert_projections_match(
                settings_for_test, pool, resources.redis, resources.elasticsearch
            ),
            timeout_s=120,
        )
    finally:
        for process in (first, second):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), timeout=60)
    assert second.returncode == 0
