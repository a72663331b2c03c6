"""The outbox relay: publishes committed events to Kafka, at least once, never skipping one.

Loop: read the oldest unpublished outbox rows (position order), send them to
Kafka keyed by aggregate id (acks from all replicas, idempotent producer), wait
for every acknowledgement, then mark the rows published. A crash between the
send and the mark publishes those rows again on restart: duplicates are
possible, losses are not. ``engine.postgres.outbox`` explains why reading
unpublished rows (instead of following a position cursor) cannot skip a
transaction that commits late, and why position order keeps every aggregate's
events in version order.

One leader at a time: a relay publishes only while it holds a session-level
advisory lock on its own connection. A second relay waits as a hot standby and
takes over when the leader's connection ends (crash, kill -9, network loss), so
two relays never interleave their batches and reorder an aggregate. The rows
are read and marked through that same connection: a leader that has lost it
cannot mark anything.

Kafka or Postgres down: the relay backs off (capped, jittered) and retries;
commands keep succeeding meanwhile because the outbox holds their events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from engine import codec
from engine.errors import ConfigurationError, TransientError
from engine.partitioning import partition_for
from engine.postgres import outbox
from engine.postgres.pool import CONNECTION_ERRORS, not_migrated
from engine.settings import KafkaSettings, PostgresSettings, RelaySettings, env_var
from engine.topics import ensure_topic

log = logging.getLogger("engine.relay")

# An arbitrary constant: the advisory-lock key whose holder is the leader relay.
LEADER_LOCK = 0x72656C6179


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    failures: int = 0


class OutboxRelay:
    """Moves events from the Postgres outbox to Kafka. Run ``run()`` or ``drain()``."""

    def __init__(
        self,
        postgres: PostgresSettings,
        kafka: KafkaSettings,
        settings: RelaySettings,
        name: str = "relay",
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._postgres = postgres
        self._kafka = kafka
        self._settings = settings
        self.name = name
        self._jitter = jitter
        self.stats = RelayStats()
        self.is_leader = False

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, surviving outages of Postgres and Kafka."""
        delay = self._settings.backoff_initial_s
        while not stop.is_set():
            try:
                await self._lead(stop, until_caught_up=False)
                delay = self._settings.backoff_initial_s
            except (KafkaError, TransientError, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                self.stats.failures += 1
                self.is_leader = False
                wait = min(self._settings.backoff_max_s, delay) * (0.5 + self._jitter() / 2)
                log.warning(
                    "%s: %s: %s; retrying in %.1fs", self.name, type(exc).__name__, exc, wait
                )
                await _wait(stop, wait)
                delay = min(self._settings.backoff_max_s, delay * 2)

    async def drain(self) -> int:
        """Publish everything committed now, then return the number of events published.

        For tests, benchmarks and one-shot use: takes the leader lock (waiting for
        another relay to let go of it) and raises on the first failure.
        """
        before = self.stats.published
        await self._lead(asyncio.Event(), until_caught_up=True)
        return self.stats.published - before

    async def _lead(self, stop: asyncio.Event, *, until_caught_up: bool) -> None:
        try:
            await self._lead_once(stop, until_caught_up=until_caught_up)
        except asyncpg.UndefinedTableError as exc:
            raise not_migrated(exc) from exc  # a ConfigurationError: retrying cannot help

    async def _lead_once(self, stop: asyncio.Event, *, until_caught_up: bool) -> None:
        conn = await asyncpg.connect(self._postgres.dsn(), timeout=10)
        try:
            await self._become_leader(conn, stop)
            if stop.is_set():
                return
            await ensure_topic(self._kafka)
            producer = _producer(self._kafka)
            await producer.start()
            try:
                await _check_partitions(producer, self._kafka)
                await self._publish_loop(conn, producer, stop, until_caught_up=until_caught_up)
            finally:
                await producer.stop()
        finally:
            self.is_leader = False
            await asyncio.shield(conn.close(timeout=5))

    async def _become_leader(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                self.is_leader = True
                log.info("%s: leading (holds the relay lock)", self.name)
                return
            await _wait(stop, self._settings.standby_retry_s)

    async def _publish_loop(
        self,
        conn: asyncpg.Connection,
        producer: AIOKafkaProducer,
        stop: asyncio.Event,
        *,
        until_caught_up: bool,
    ) -> None:
        wake = asyncio.Event()

        def on_notify(*_args: object) -> None:
            wake.set()

        await conn.add_listener(outbox.NOTIFY_CHANNEL, on_notify)
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        try:
            while not stop.is_set():
                wake.clear()
                sent = await self._publish_batch(conn, producer)
                if loop.time() >= next_cleanup:
                    await outbox.purge_published(conn, self._settings.retention_hours)
                    next_cleanup = loop.time() + self._settings.cleanup_interval_s
                if sent:
                    continue
                if until_caught_up:
                    return
                await _wait_any(stop, wake, self._settings.poll_interval_s)
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await conn.remove_listener(outbox.NOTIFY_CHANNEL, on_notify)

    async def _publish_batch(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> int:
        events = await outbox.fetch_pending(conn, self._settings.batch_size)
        if not events:
            return 0
        acks = []
        for envelope in events:
            record = codec.encode(envelope)
            acks.append(
                await producer.send(
                    self._kafka.topic,
                    key=record.key,
                    value=record.value,
                    headers=record.headers,
                    partition=partition_for(envelope.aggregate_id, self._kafka.partitions),
                )
            )
        # Mark only after Kafka acknowledged every one of them.
        outcomes = await asyncio.gather(*acks, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        published = [
            outbox.Published(e.position, meta.partition, meta.offset)
            for e, meta in zip(events, outcomes, strict=True)
            if not isinstance(meta, BaseException)
        ]
        await asyncio.shield(outbox.mark_published(conn, published))
        self.stats.published += len(events)
        self.stats.batches += 1
        return len(events)


async def _check_partitions(producer: AIOKafkaProducer, kafka: KafkaSettings) -> None:
    """Refuse a topic whose partition count differs from the setting.

    Events go to an explicitly computed partition, and consistency tokens name
    it; with another count both would be wrong, so this is a configuration error.
    """
    actual = len(await producer.partitions_for(kafka.topic))
    if actual != kafka.partitions:
        raise ConfigurationError(
            f"topic {kafka.topic!r} has {actual} partitions but "
            f"{env_var('kafka', 'partitions')} is {kafka.partitions}; set it to {actual}"
        )


def _producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Sleep until ``stop`` or ``wake`` is set, or ``seconds`` pass (the polling fallback)."""
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
