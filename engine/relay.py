"""The outbox relay: publishes committed events to Kafka, at least once, never skipping one.

Loop: read the oldest unpublished outbox rows (position order), send them to
Kafka keyed by aggregate id (acks from all replicas, idempotent producer), then
mark published exactly the rows Kafka acknowledged, with the partition and
offset it acknowledged each at. A crash between the send and the mark
publishes those rows again on restart: duplicates are possible, losses are
not. ``engine.postgres.outbox`` explains why reading unpublished rows (instead
of following a position cursor) cannot skip a transaction that commits late,
and why position order keeps every aggregate's events in version order.

**In-partition order, even when one send fails and later ones succeed.** What
we claim: in every partition, the *first occurrence* of each version of an
aggregate comes after the first occurrence of the version before it (repeats
may follow; the projections skip versions they have already applied). A batch
of rows is split by partition; each partition's rows are sent in position
order as record batches, one at a time, the next only after Kafka acknowledged
the previous one; partitions go in parallel. A partition stops at its first
failure, the rows acknowledged so far are marked, and the rest stay
unpublished for the next round, which resends them in order. Why that is
enough: take versions v and v+1 of one aggregate (same partition, v at the
lower position). Whoever sends v+1 (this relay, a later round, another relay
or a leader that was declared dead) read it as unpublished in a batch, and v
was then either marked published (so Kafka had acknowledged v) or in the same
batch at a lower position (``outbox.fetch_pending`` returns the oldest rows, and
v committed before v+1). In the first case v is in Kafka before anyone sends
v+1; in the second, v's record batch was acknowledged before v+1's was sent.
Either way v's first occurrence precedes v+1's. Sending everything at once and
raising on any failure (what this relay did before) breaks this: a failed v
and an acknowledged v+1 leave v+1 first, and the retry's v lands after it.

**One leader at a time, and a leader that goes silent is replaced in bounded
time.** A relay publishes only while it holds a session-level advisory lock on
its own connection, so two relays never interleave their batches. The rows are
read and marked through that same connection: a leader that has lost it
cannot mark anything. A lock alone is not enough for liveness: a frozen
process (SIGSTOP, a VM pause) or a half-open TCP connection keeps the server
session, and so the lock, for hours while nothing is published. So the leader
also holds a lease: a row in ``engine_relay_lease`` naming its backend pid,
renewed through the locked connection every quarter of
``RelaySettings.leader_timeout_s``. Every Postgres step of the leader is
bounded by the same quarter, so a renewal is at most three quarters late
while the leader is healthy, and a leader that cannot renew gives up itself.
A standby that cannot take the lock looks at the holder (``pg_locks``): if that
backend has not renewed a lease within ``leader_timeout_s`` and the standby
has seen that same backend holding the lock for at least as long, it
terminates it (``pg_terminate_backend``, in one statement that re-checks the
lease, so a leader renewing at that instant is spared); the server releases
the lock and the standby takes it at its next try. Publishing therefore resumes
within about ``leader_timeout_s + standby_retry_s`` of the leader's last
renewal. The lock is taken and the lease written in one statement; the
"seen for as long" rule covers the instant between the two, when a new
leader's lease is not yet visible. The old leader, if it wakes up, finds its
connection gone: it cannot mark anything and goes back to standing by.
Records it still had in flight are duplicates of rows it read as unpublished,
sent in order; by the argument above they cannot put a version before its
predecessor. Server-side TCP keepalives and ``tcp_user_timeout`` on the leader's
connection also let Postgres drop a dead client by itself.

**A topic whose partition count differs from the setting.** Events go to the
partition ``partition_for(aggregate_id, partitions)`` names, and consistency
tokens name it too; with another count an aggregate's next events would land
on another partition than its earlier ones, and nothing would keep them in
order. The relay then publishes nothing: it logs an error saying what is
wrong and the safe procedure (see ``_check_partitions``), lets go of the lock,
and re-checks every ``backoff_max_s``; the rest of the engine keeps running.
``drain()`` raises the ConfigurationError instead.

Kafka or Postgres down: the relay backs off (capped, jittered) and retries;
commands keep succeeding meanwhile because the outbox holds their events. Each
Postgres step and each Kafka step is wrapped in its own driver's seam
(``engine.drivers``), so a failure, a timeout included, arrives as an engine
error naming the service it came from and that service's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from engine import codec, metrics
from engine.drivers import kafka_address, kafka_errors, postgres_address, postgres_errors
from engine.errors import ConfigurationError, TransientError
from engine.events import EventEnvelope
from engine.partitioning import partition_for
from engine.postgres import outbox
from engine.retry import Backoff
from engine.settings import KafkaSettings, PostgresSettings, RelaySettings, env_var
from engine.topics import ensure_topic

log = logging.getLogger("engine.relay")

# An arbitrary constant: the advisory-lock key whose holder is the leader relay.
LEADER_LOCK = 0x72656C6179

# How pg_locks shows a bigint advisory key: high and low 32 bits, objsubid 1.
_LOCK_ROW = """
    l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

# Takes the lock and writes the lease in one statement (see the module docstring).
_TAKE = """
    INSERT INTO engine_relay_lease AS s (lock_key, holder_pid, holder_name, renewed_at)
    SELECT $1, pg_backend_pid(), $2, clock_timestamp() WHERE pg_try_advisory_lock($1)
    ON CONFLICT (lock_key) DO UPDATE SET holder_pid = EXCLUDED.holder_pid,
        holder_name = EXCLUDED.holder_name, renewed_at = EXCLUDED.renewed_at
    RETURNING true
"""

_RENEW = """
    UPDATE engine_relay_lease SET renewed_at = clock_timestamp()
    WHERE lock_key = $1 AND holder_pid = pg_backend_pid()
    RETURNING true
"""

_HOLDER = f"""
    SELECT l.pid, s.holder_name,
        s.renewed_at > clock_timestamp() - make_interval(secs => $2) AS fresh
    FROM pg_locks l
    LEFT JOIN engine_relay_lease s ON s.lock_key = $1 AND s.holder_pid = l.pid
    WHERE {_LOCK_ROW}
"""

_TERMINATE = f"""
    SELECT pg_terminate_backend(l.pid) FROM pg_locks l
    WHERE {_LOCK_ROW} AND l.pid = $3 AND NOT EXISTS (
        SELECT 1 FROM engine_relay_lease s WHERE s.lock_key = $1 AND s.holder_pid = l.pid
            AND s.renewed_at > clock_timestamp() - make_interval(secs => $2))
"""


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    failures: int = 0
    # Times the relay found the topic's partition count differing from the setting.
    refusals: int = 0
    # Silent leaders this relay terminated to take over.
    takeovers: int = 0


class _PartitionMismatch(ConfigurationError):
    """The topic's partition count differs from the setting (``run`` waits, ``drain`` raises)."""


class _Session:
    """The leader's connection, used by the publish loop and the lease keeper one at a time."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._lock:
            yield self.conn


class OutboxRelay:
    """Moves events from the Postgres outbox to Kafka. Run ``run()`` or ``drain()``.

    ``producer_factory`` builds the Kafka producer (the default is the
    configured one); tests pass one that injects faults.
    """

    def __init__(
        self,
        postgres: PostgresSettings,
        kafka: KafkaSettings,
        settings: RelaySettings,
        name: str = "relay",
        *,
        jitter: Callable[[], float] = random.random,
        producer_factory: Callable[[KafkaSettings], AIOKafkaProducer] | None = None,
    ) -> None:
        self._postgres = postgres
        self._kafka = kafka
        # Where each service is, for the errors of its steps (engine.drivers).
        self._postgres_at = postgres_address(postgres)
        self._kafka_at = kafka_address(kafka)
        self._settings = settings
        self.name = name
        self._jitter = jitter
        self._producer_factory = producer_factory or _producer
        self.stats = RelayStats()
        self.is_leader = False
        # Why the relay is not publishing although it could lead, or None.
        self.refused: str | None = None
        # Quarter of the leader timeout: renewal period and bound of each Postgres step.
        self._step_s = settings.leader_timeout_s / 4
        # Bound of each Kafka step: the producer's own timeout, plus a margin.
        self._kafka_step_s = kafka.request_timeout_s + settings.leader_timeout_s

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, surviving outages of Postgres and Kafka."""
        # Not engine.retry.retrying: this loop never ends in a success (leading
        # ends only when stop is set), a refusal waits without backing off, and
        # every wait must end as soon as stop is set.
        backoff = Backoff(
            self._settings.backoff_initial_s, self._settings.backoff_max_s, jitter=self._jitter
        )
        while not stop.is_set():
            try:
                await self._lead(stop, until_caught_up=False)
                backoff.reset()
            except _PartitionMismatch as exc:
                # Not fatal: `engine up` would take the daemon and the API down with us.
                wait = self._settings.backoff_max_s
                log.error("%s: %s (checking again in %gs)", self.name, exc, wait)
                await _wait(stop, wait)
            except (TransientError, asyncpg.PostgresError) as exc:
                # TransientError: an outage or refusal of Postgres or Kafka, as the seams
                # translate it, or the lease lost. asyncpg.PostgresError: what the seam
                # leaves to the caller on purpose (a refused login, a revoked privilege, a
                # read-only server after a failover): this loop has no caller to hand it
                # to, and an operator can fix it while we wait. A missing schema is not
                # retried (a SchemaMissingError): only `engine migrate` helps.
                self.stats.failures += 1
                self.is_leader = False
                wait = backoff.next_delay()
                log.warning(
                    "%s: %s: %s; retrying in %.1fs", self.name, type(exc).__name__, exc, wait
                )
                await _wait(stop, wait)

    async def drain(self) -> int:
        """Publish everything committed now, then return the number of events published.

        For tests, benchmarks and one-shot use: takes the leader lock (waiting for
        another relay to let go of it, or terminating one that has gone silent)
        and raises the first failure, as an engine error (see ``engine.drivers``).
        """
        before = self.stats.published
        await self._lead(asyncio.Event(), until_caught_up=True)
        return self.stats.published - before

    async def _lead(self, stop: asyncio.Event, *, until_caught_up: bool) -> None:
        conn = await self._connect()
        try:
            await self._become_leader(conn, stop)
            if stop.is_set():
                return
            session = _Session(conn)
            await _until_first(
                self._publish(session, stop, until_caught_up=until_caught_up),
                self._keep_lease(session),
            )
        finally:
            self.is_leader = False
            # A connection that cannot close cleanly is aborted: nothing is left open, and
            # its error would only hide why we are leaving.
            quiet = contextlib.suppress(TransientError, asyncpg.PostgresError)
            with quiet, postgres_errors(self._postgres_at):
                await asyncio.shield(conn.close(timeout=5))

    async def _connect(self) -> asyncpg.Connection:
        timeout_s = self._settings.leader_timeout_s
        with postgres_errors(self._postgres_at):
            return await asyncpg.connect(
                self._postgres.dsn(),
                timeout=10,
                command_timeout=self._step_s,
                server_settings={
                    "application_name": f"engine-relay:{self.name}"[:63],
                    # Postgres drops a client that stopped answering by itself, within
                    # about the leader timeout (probes start at a quarter of it).
                    "tcp_keepalives_idle": str(max(1, int(timeout_s / 4))),
                    "tcp_keepalives_interval": str(max(1, int(timeout_s / 8))),
                    "tcp_keepalives_count": "4",
                    "tcp_user_timeout": str(int(timeout_s * 1000)),
                },
            )

    async def _become_leader(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        holder: tuple[int, float] | None = None  # the lock holder's pid, and since when we see it
        while not stop.is_set():
            with postgres_errors(self._postgres_at):
                if await conn.fetchval(_TAKE, LEADER_LOCK, self.name):
                    self.is_leader = True
                    log.info("%s: leading (holds the relay lock and lease)", self.name)
                    return
                row = await conn.fetchrow(_HOLDER, LEADER_LOCK, self._settings.leader_timeout_s)
                if row is not None:
                    if holder is None or holder[0] != row["pid"]:
                        holder = (row["pid"], loop.time())
                    watched_s = loop.time() - holder[1]
                    if not row["fresh"] and watched_s >= self._settings.leader_timeout_s:
                        await self._terminate(conn, row["pid"], row["holder_name"])
            await _wait(stop, self._settings.standby_retry_s)

    async def _terminate(self, conn: asyncpg.Connection, pid: int, name: str | None) -> None:
        if await conn.fetchval(_TERMINATE, LEADER_LOCK, self._settings.leader_timeout_s, pid):
            self.stats.takeovers += 1
            log.warning(
                "%s: the leader %s (Postgres backend %d) has not renewed its lease for %.0fs;"
                " terminating it",
                self.name,
                name or "(no lease)",
                pid,
                self._settings.leader_timeout_s,
            )

    async def _keep_lease(self, session: _Session) -> None:
        """Renew the lease every quarter of the leader timeout; raise as soon as we cannot."""
        while True:
            await asyncio.sleep(self._step_s)
            with postgres_errors(self._postgres_at):
                async with session.use() as conn:
                    renewed = await conn.fetchval(_RENEW, LEADER_LOCK)
            if not renewed:
                raise TransientError(f"{self.name}: the relay lease is no longer ours")

    async def _publish(
        self, session: _Session, stop: asyncio.Event, *, until_caught_up: bool
    ) -> None:
        with kafka_errors(self._kafka_at):
            await asyncio.wait_for(ensure_topic(self._kafka), self._kafka_step_s)
        producer = self._producer_factory(self._kafka)
        try:
            with kafka_errors(self._kafka_at):
                await asyncio.wait_for(producer.start(), self._kafka_step_s)
            await self._check_partitions(producer)
            await self._publish_loop(session, producer, stop, until_caught_up=until_caught_up)
        finally:
            # Whatever Kafka says while we let go would hide why we are leaving.
            with contextlib.suppress(TransientError), kafka_errors(self._kafka_at):
                await asyncio.wait_for(producer.stop(), self._kafka_step_s)

    async def _publish_loop(
        self, session: _Session, producer: AIOKafkaProducer, stop: asyncio.Event, *,
        until_caught_up: bool,
    ) -> None:  # fmt: skip
        wake = asyncio.Event()

        def on_notify(*_args: object) -> None:
            wake.set()

        with postgres_errors(self._postgres_at):
            async with session.use() as conn:
                await conn.add_listener(outbox.NOTIFY_CHANNEL, on_notify)
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        try:
            while not stop.is_set():
                wake.clear()
                sent = await self._publish_batch(session, producer)
                if loop.time() >= next_cleanup:
                    await self._check_partitions(producer)  # an operator may have changed it
                    await self._purge(session)
                    next_cleanup = loop.time() + self._settings.cleanup_interval_s
                if sent:
                    continue
                if until_caught_up:
                    return
                await _wait_any(stop, wake, self._settings.poll_interval_s)
        finally:
            quiet = contextlib.suppress(TransientError, asyncpg.PostgresError)
            with quiet, postgres_errors(self._postgres_at):
                async with session.use() as conn:
                    await conn.remove_listener(outbox.NOTIFY_CHANNEL, on_notify)

    async def _purge(self, session: _Session) -> None:
        # Bounded like every step, so it cannot starve the lease; a purge too big
        # for the bound is skipped (the next one retries) rather than stop publishing.
        # Caught inside the seam: here a timeout is the purge's size, not an outage.
        with postgres_errors(self._postgres_at):
            async with session.use() as conn:
                try:
                    await outbox.purge_published(conn, self._settings.retention_hours)
                except (TimeoutError, asyncpg.QueryCanceledError):
                    log.warning(
                        "%s: purging published outbox rows took too long; will retry", self.name
                    )

    async def _publish_batch(self, session: _Session, producer: AIOKafkaProducer) -> int:
        with postgres_errors(self._postgres_at):
            async with session.use() as conn:
                events = await outbox.fetch_pending(conn, self._settings.batch_size)
        if not events:
            return 0
        lanes: dict[int, list[EventEnvelope]] = {}
        for envelope in events:
            partition = partition_for(envelope.aggregate_id, self._kafka.partitions)
            lanes.setdefault(partition, []).append(envelope)
        with kafka_errors(self._kafka_at):
            outcomes = await asyncio.gather(
                *(self._send_in_order(producer, p, lane) for p, lane in lanes.items())
            )
        published = [p for acked, _ in outcomes for p in acked]
        if published:
            # Exactly the acknowledged rows, with where Kafka put each of them.
            with postgres_errors(self._postgres_at):
                async with session.use() as conn:
                    await asyncio.shield(outbox.mark_published(conn, published))
            self.stats.published += len(published)
            self.stats.batches += 1
            metrics.RELAY_PUBLISHED.inc(len(published))
        for _, failure in outcomes:
            if failure is not None:
                # After marking: the next round resends only the rest.
                with kafka_errors(self._kafka_at):
                    raise failure
        return len(published)

    async def _send_in_order(
        self, producer: AIOKafkaProducer, partition: int, lane: list[EventEnvelope]
    ) -> tuple[list[outbox.Published], KafkaError | TimeoutError | None]:
        """Send one partition's events as record batches, each after the previous one's ack.

        Stops at the first failure; returns what was acknowledged, and the failure.
        """
        acked: list[outbox.Published] = []
        pending = [(envelope, codec.encode(envelope)) for envelope in lane]
        start = 0
        try:
            while start < len(pending):
                batch = producer.create_batch()
                end = start
                # A batch always takes its first record, so ``end`` advances.
                while end < len(pending):
                    record = pending[end][1]
                    appended = batch.append(
                        key=record.key, value=record.value, timestamp=None, headers=record.headers
                    )
                    if appended is None:
                        break
                    end += 1
                batch.close()
                async with asyncio.timeout(self._kafka_step_s):
                    ack = await producer.send_batch(batch, self._kafka.topic, partition=partition)
                    meta = await ack
                _observe_commit_to_ack(pending[start:end])
                # Record n of a batch is at the batch's base offset + n.
                acked.extend(
                    outbox.Published(envelope.position, meta.partition, meta.offset + n)
                    for n, (envelope, _) in enumerate(pending[start:end])
                )
                start = end
        except (KafkaError, TimeoutError) as exc:
            return acked, exc
        return acked, None

    async def _check_partitions(self, producer: AIOKafkaProducer) -> None:
        """Refuse a topic whose partition count differs from the setting, saying what is safe."""
        kafka = self._kafka
        with kafka_errors(self._kafka_at):
            actual = len(await producer.partitions_for(kafka.topic))
        if actual == kafka.partitions:
            self.refused = None
            return
        self.stats.refusals += 1
        self.refused = (
            f"topic {kafka.topic!r} has {actual} partitions but"
            f" {env_var('kafka', 'partitions')} is {kafka.partitions}: the relay publishes"
            " nothing until they agree. Events go to the partition computed from that setting,"
            " so another count would move aggregates to other partitions mid-stream and break"
            " their order: do not change either on a topic in use. If the setting was changed by"
            " mistake, restore the count the topic was created with. To change the count safely:"
            " stop the writers (API, commands), let the relay publish everything and the daemon"
            " catch up, create a new topic with the new count, set"
            f" {env_var('kafka', 'topic')} and {env_var('kafka', 'partitions')} to it together"
            " for every engine process and restart them; rebuild the projections afterwards"
            " only if you want them replayed."
        )
        raise _PartitionMismatch(self.refused)


def _observe_commit_to_ack(sent: Sequence[tuple[EventEnvelope, object]]) -> None:
    """Each acknowledged event's time from its ``occurred_at`` (in its transaction) to now."""
    acked_at = time.time()
    for envelope, _ in sent:
        metrics.RELAY_COMMIT_TO_ACK_SECONDS.observe(
            max(0.0, acked_at - envelope.occurred_at.timestamp())
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


async def _until_first(*steps: Awaitable[None]) -> None:
    """Run ``steps`` together until one returns or raises; cancel the rest; re-raise its error."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


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
