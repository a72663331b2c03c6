"""Faults the daemon's tests inject into the real stack, and waiting on their effects.

Elasticsearch is frozen with SIGSTOP, not stopped: its sockets stay open and
every request simply gets no answer, which is what a hung store (GC pause, VM
freeze, a wedged disk) looks like to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from engine import Settings
from engine.partitioning import partition_for
from engine.stack import StackManager
from engine.stack.process import running


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the Elasticsearch launcher and its server JVM)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            found.extend(_tree(int(child)))
    return found


def frozen_elasticsearch(settings: Settings) -> AbstractAsyncContextManager[None]:
    """Elasticsearch frozen (SIGSTOP) inside the block, always resumed (SIGCONT) after it."""
    return frozen(settings, "elasticsearch")


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Wait until ``condition()`` is true, polling; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(0.05)


def fast_detaching(settings: Settings) -> Settings:
    """Small batches and a one-batch queue: a lane with no answer is detached within a second."""
    runner = settings.runner.model_copy(
        update={
            "batch_size": 10,
            "lane_queue_batches": 1,
            "slow_lane_timeout_s": 1.0,
            "stall_timeout_s": 1.0,
            "backoff_max_s": 0.5,
            "shutdown_timeout_s": 2.0,
        }
    )
    return settings.model_copy(update={"runner": runner})


async def assert_committed_to_the_end(settings: Settings) -> None:
    """Every partition's committed offset (of the test's group) is the topic's end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.runner.group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)
        ]
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) or 0 for tp in partitions}
        assert committed == ends
    finally:
        await consumer.stop()


async def produce_to_topic(settings: Settings, aggregate_id: str, values: list[bytes]) -> None:
    """Produce raw messages straight to the topic, keyed and partitioned as the relay does.

    What a buggy or newer producer would put next to the relay's events.
    """
    kafka = settings.kafka
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(
                kafka.topic,
                value,
                key=aggregate_id.encode(),
                partition=partition_for(aggregate_id, kafka.partitions),
            )
    finally:
        await producer.stop()


@asynccontextmanager
async def frozen(settings: Settings, service: str) -> AsyncIterator[None]:
    """A service of the native stack frozen (SIGSTOP, its whole process tree) inside the block.

    Always resumed (SIGCONT) after it, even when the block is cancelled.
    """
    manager = StackManager(settings, lambda _line: None)
    proc = running(manager.layout.pid_file(service))
    if proc is None:
        pytest.skip(f"{service} is not run by the native local stack here; cannot freeze it")
    pids = _tree(proc.pid)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# Stopping and starting stack services from worker threads: one at a time, so a start
# asked for while a restart is still running waits for it instead of racing it.
_STACK_CHANGES = threading.Lock()


async def restart_postgres(settings: Settings, down_s: float) -> None:
    """Stop the stack's Postgres server, keep it down ``down_s``, start it again.

    A real restart: every session is ended (fast shutdown), new connections are
    refused meanwhile. The stop and the start run in one worker thread whose
    start is in a ``finally``, so Postgres is started again even if the caller
    is cancelled; this returns once the test's database accepts connections.
    """
    manager = StackManager(settings, lambda _line: None)
    if running(manager.layout.pid_file("postgres")) is None:
        pytest.skip("Postgres is not run by the native local stack here; cannot restart it")

    def stop_then_start() -> None:
        with _STACK_CHANGES:
            try:
                manager.down(["postgres"])
                time.sleep(down_s)
            finally:
                manager.up(["postgres"])

    await asyncio.shield(asyncio.to_thread(stop_then_start))
    await until_postgres_accepts(settings)


async def ensure_postgres_up(settings: Settings) -> None:
    """Start the stack's Postgres if it is not running (idempotent); wait until it accepts."""
    manager = StackManager(settings, lambda _line: None)

    def start() -> None:
        with _STACK_CHANGES:
            manager.up(["postgres"])

    await asyncio.to_thread(start)
    await until_postgres_accepts(settings)


async def until_postgres_accepts(settings: Settings, timeout_s: float = 120.0) -> None:
    """Poll until a connection to the test's database succeeds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            conn = await asyncpg.connect(settings.postgres.dsn(), timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            assert loop.time() < deadline, f"Postgres refused connections for {timeout_s}s: {exc}"
            await asyncio.sleep(0.2)
        else:
            await conn.close()
            return


async def failures_of(
    tasks: Sequence[asyncio.Task[Any]], timeout_s: float = 60
) -> list[BaseException]:
    """Wait (bounded) for ``tasks`` to end; the exceptions they ended with."""
    outcomes = await asyncio.wait_for(
        asyncio.gather(*tasks, return_exceptions=True), timeout=timeout_s
    )
    return [o for o in outcomes if isinstance(o, BaseException)]
