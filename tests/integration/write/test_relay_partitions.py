"""A topic whose partition count differs from the setting: the relay refuses, stays up, resumes.

Publishing with the wrong count would send an aggregate's next events to
another partition than its earlier ones (and than its consistency tokens
name). The relay must neither do that nor die (``engine up`` would take the
daemon and the API down with it): it reports why, waits, and re-checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from engine import CommandBus, OutboxRelay, RelaySettings, Settings, ensure_topic, partition_for
from engine.postgres import outbox
from tests.helpers import consume, new_customer, settings_env

ROOT = Path(__file__).resolve().parents[3]


async def _pending(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return await outbox.pending_count(conn)


async def _grow_topic(settings: Settings, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_partitions({settings.kafka.topic: NewPartitions(total_count=partitions)})
    finally:
        await admin.close()


async def test_the_relay_refuses_a_mismatched_topic_without_dying_and_resumes_once_it_matches(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    customer = await new_customer(bus)
    await ensure_topic(settings_for_test.kafka)  # 3 partitions
    five = settings_for_test.kafka.model_copy(update={"partitions": 5})
    relay = OutboxRelay(
        settings_for_test.postgres,
        five,
        RelaySettings(poll_interval_s=0.2, standby_retry_s=0.1, backoff_max_s=0.3),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 30
        while getattr(relay.stats, "refusals", 0) < 3:
            assert not task.done(), f"the relay stopped: {task.exception()!r}"
            assert loop.time() < deadline, "the relay never reported the mismatch"
            await asyncio.sleep(0.05)
        assert not task.done()  # re-checked three times, still running
        reason = relay.refused
        assert reason is not None
        assert "has 3 partitions" in reason and "ENGINE_KAFKA__PARTITIONS is 5" in reason
        assert "new topic" in reason  # the safe procedure, not "set it to 3"
        assert any(r.levelno == logging.ERROR and "has 3 partitions" in r.message
                   for r in caplog.records)  # fmt: skip
        assert await _pending(pool) == 1  # nothing published
        assert await consume(settings_for_test.kafka, 1, timeout_s=2) == []

        # An operator fixes it (here the topic, still empty, gets the intended count).
        await _grow_topic(settings_for_test, 5)
        deadline = loop.time() + 30
        while await _pending(pool):
            assert not task.done(), f"the relay stopped: {task.exception()!r}"
            assert loop.time() < deadline, "the relay did not resume once the topic matched"
            await asyncio.sleep(0.05)
        assert relay.refused is None
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    [event] = await consume(five, 1)
    assert event.aggregate_id == customer
    row = await pool.fetchrow("SELECT kafka_partition FROM engine_outbox")
    assert row is not None and row["kafka_partition"] == partition_for(customer, 5)


async def test_engine_relay_with_a_mismatched_topic_stays_up_and_says_why(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, tmp_path: Path
) -> None:
    """What keeps ``engine up`` running: its relay child does not exit."""
    await new_customer(bus)
    await ensure_topic(settings_for_test.kafka)  # 3 partitions
    log = tmp_path / "relay.log"
    env = {
        **os.environ,
        **settings_env(settings_for_test),
        "ENGINE_KAFKA__PARTITIONS": "5",
        "ENGINE_RELAY__BACKOFF_MAX_S": "0.5",
        "COLUMNS": "250",
    }
    with log.open("wb") as sink:
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine", "relay", "--log-level", "info",
            env=env, cwd=ROOT, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        # Said at every re-check (0.5 s apart): three times means it outlived two of them.
        while log.read_text().count("has 3 partitions") < 3:
            assert relay.returncode is None, log.read_text()
            assert loop.time() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        assert relay.returncode is None, log.read_text()
        assert await _pending(pool) == 1
    finally:
        if relay.returncode is None:
            relay.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(relay.wait(), timeout=30)
    assert code == 0, log.read_text()
