"""Fault tests of the relay: kill -9 mid-run, and Kafka down while commands keep coming."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, RelaySettings, Settings
from engine.postgres import outbox
from engine.stack import StackManager
from engine.stack.process import running
from projections.orders import ConfirmOrder
from tests.helpers import (
    assert_in_order_without_gaps,
    consume,
    new_customer,
    new_order,
    new_product,
)

ROOT = Path(__file__).resolve().parents[3]
ENGINE = (sys.executable, "-m", "engine")


async def _append_synthetic(pool: asyncpg.Pool, aggregates: int, versions: int) -> int:
    """Queue aggregates x versions events, interleaved across aggregates as real traffic is."""
    now = datetime.now(UTC)
    rows = [
        (
            uuid.uuid4(),
            "SyntheticHappened",
            1,
            "synthetic",
            f"agg-{a}",
            v,
            now,
            uuid.uuid4(),
            uuid.uuid4(),
            f'{{"n": {v}}}',
        )
        for v in range(1, versions + 1)
        for a in range(aggregates)
    ]
    async with pool.acquire() as conn, conn.transaction():
        await outbox.append(conn, rows)
    return len(rows)


async def _published(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM engine_outbox WHERE published_at IS NOT NULL")
    )


def _relay_env(settings: Settings, batch_size: int) -> dict[str, str]:
    return {
        **os.environ,
        "ENGINE_POSTGRES__DATABASE": settings.postgres.database,
        "ENGINE_KAFKA__TOPIC": settings.kafka.topic,
        "ENGINE_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "ENGINE_RELAY__BATCH_SIZE": str(batch_size),
    }


async def test_relay_killed_with_sigkill_mid_run_delivers_everything_after_restart(
    pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    total = await _append_synthetic(pool, aggregates=40, versions=300)
    relay = await asyncio.create_subprocess_exec(
        *ENGINE,
        "relay",
        "--log-level",
        "warning",
        env=_relay_env(settings_for_test, batch_size=20),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await _published(pool) == 0:
            assert loop.time() < deadline, "the relay never started publishing"
            await asyncio.sleep(0.01)
    finally:
        relay.send_signal(signal.SIGKILL)
        await asyncio.wait_for(relay.wait(), timeout=30)
    at_kill = await _published(pool)
    assert 0 < at_kill < total, "the kill must land in the middle of the run"

    again = await asyncio.create_subprocess_exec(
        *ENGINE,
        "relay",
        "--once",
        "--log-level",
        "warning",
        env=_relay_env(settings_for_test, batch_size=500),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(again.communicate(), timeout=300)
    assert again.returncode == 0, stderr.decode()
    assert await _published(pool) == total

    events = await consume(settings_for_test.kafka, total, timeout_s=120)
    assert {e.position for e in events} == set(range(1, total + 1))  # nothing lost
    assert_in_order_without_gaps(events)  # duplicates allowed, reordering not


async def test_commands_succeed_while_kafka_is_down_and_the_relay_catches_up(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    manager = StackManager(settings_for_test, lambda _line: None)
    if running(manager.layout.pid_file("kafka")) is None:
        pytest.skip("Kafka is not run by the native local stack here; cannot stop it")
    stop = asyncio.Event()
    relay = OutboxRelay(
        settings_for_test.postgres,
        settings_for_test.kafka.model_copy(update={"request_timeout_s": 5.0}),
        RelaySettings(poll_interval_s=0.2, backoff_initial_s=0.2, backoff_max_s=1.0),
    )
    await asyncio.to_thread(manager.down, ["kafka"])
    try:
        task = asyncio.create_task(relay.run(stop))
        customer = await new_customer(bus)
        product = await new_product(bus)
        orders = [(await new_order(bus, customer, [(product, 2)])).aggregate_id for _ in range(5)]
        for order in orders:
            await bus.execute(ConfirmOrder(order_id=uuid.UUID(order)))
        total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while relay.stats.failures < 2:
            assert loop.time() < deadline, "the relay should be failing while Kafka is down"
            await asyncio.sleep(0.1)
        assert await _published(pool) == 0
    finally:
        await asyncio.to_thread(manager.up, ["kafka"])
    try:
        deadline = loop.time() + 120
        while await _published(pool) < total:
            assert loop.time() < deadline, "the relay did not catch up after Kafka returned"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    events = await consume(settings_for_test.kafka, total)
    assert {e.position for e in events} == set(range(1, total + 1))
    assert_in_order_without_gaps(events)
