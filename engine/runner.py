"""The projection daemon: one Kafka consumer group, fanned out to every projection's lane.

The dispatcher fetches a batch (up to ``batch_size`` records, waiting at most
``max_latency_ms``), decodes each message once (poison goes to the dead-letter
store for all projections, marked ``*``), and hands the batch to every lane.
Lanes apply concurrently; the dispatcher commits, per partition, the lowest
offset any lane has not finished, so an offset is committed only after every
projection durably applied (or dead-lettered) everything before it.

Failure isolation: a lane that cannot keep up is *detached*: its queued
batches are dropped, it stops receiving new ones, and, once its store accepts
writes again, it catches up alone from its own offsets with a private,
group-less consumer, and re-attaches when it reaches the dispatcher.
Meanwhile the other lanes stay current. Commits never pass a detached lane's
offsets, so a restart or rebalance loses nothing; the healthy lanes see those
events again and skip them by version.

How long one store can hold the others back. The dispatcher only waits for a
lane whose queue (``lane_queue_batches``) is full, and a slot frees each time
the lane finishes a batch; so it waits for the lane's *store*, and what
matters is whether that store answers:

- it answers with errors (``lane.failing``): detached at once;
- it does not answer at all: the lane records when its current store call
  started (``lane.waiting_since``, cleared by any answer, error included);
  once a call has been unanswered for ``stall_timeout_s`` the lane is
  detached. The queue fills only after the store went quiet, so the others
  are held at most ``stall_timeout_s`` after the store's last answer;
- it answers, slowly: each finished batch frees a slot, so the dispatcher
  keeps pace with it (back-pressure) and does not detach it, which would only
  turn into a cycle of catch-up, re-attach and detach. Only a single wait for
  room longer than ``slow_lane_timeout_s`` detaches it.

The cost of the distinction: one store call (one batch) that legitimately
takes longer than ``stall_timeout_s`` counts as hung; keep the setting above
the store's slowest normal batch at ``batch_size``.

How a detached lane catches up alone, and what happens when the topic's
retention overtook it (it is *stranded*): :mod:`engine.catch_up`.

A group offset the retention overtook. While every daemon is down, the
retention can delete events past the group's committed offset. The consumer
would reset to the log's start (``auto_offset_reset="earliest"``, which a new
group needs) and every lane would go on past the hole without a word: the
dispatcher checks version gaps only against what it saw since its own start,
and an aggregate whose events are all gone leaves no trace. So when partitions
are assigned, before anything is fetched from them, ``check_retention``
compares each one's committed offset with the log's start; where it is below
(or missing: a new group id, or offsets Kafka expired), every lane whose own
place (the further of the group's offset and its recorded progress) is below
the start is stranded as a catch-up would strand it: detached, saying to run
``engine rebuild``, keeping its place in the commit minimum. The other lanes go
on. A lane with no place at all (a new projection, or a new deployment) cannot
be told from one that lost it, and starts at the log's start as before.

A rebuild raises the projection's recorded progress to the topic's end
(:mod:`engine.rebuild`, step 4), so the restart after it finds the lane's place
above the start and does not strand it again, though the group's offset is
still below it until the first commit.

Commits. A commit the group refuses because it is rebalancing (another daemon
joined or left: CommitFailedError, IllegalGeneration, UnknownMemberId,
RebalanceInProgress) is logged and dropped, not raised: ``_committed`` is not
advanced, so the next commit after the rebalance carries the same offsets
(or ``revoke`` does, before the partitions move). Committing less is always
safe here; the daemon ending on it was not.

Rebalance: when partitions are revoked, queued work is flushed (bounded by
``shutdown_timeout_s``) and the safe offsets committed before the partitions
move. Shutdown does the same for everything, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from engine.catch_up import CatchUps
from engine.decoding import Decoder
from engine.deliveries import Batch
from engine.drivers import kafka_address, kafka_errors
from engine.errors import ConfigurationError
from engine.lane import Lane
from engine.postgres.checkpoints import CheckpointStore
from engine.postgres.deadletters import DeadLetterStore
from engine.registry import EventRegistry
from engine.retry import Backoff, retrying
from engine.settings import KafkaSettings, RunnerSettings
from engine.startup import StartupStopped

log = logging.getLogger("engine.runner")

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# The group moved on under a commit (another daemon joined or left): the offsets are
# not lost, the next commit after the rebalance carries them (see "Commits" above).
_STALE_COMMIT = (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)


class LaneObserver(Protocol):
    """Watches the runner's lanes while it runs (e.g. records their state for ``engine status``).

    ``watch`` runs on its own task from the start of :meth:`ProjectionRunner.run`
    until shutdown cancels it; it only reads the runner, and an error in it is
    logged, never the daemon's end.
    """

    async def watch(self, runner: ProjectionRunner) -> None: ...


class ProjectionRunner:
    """Runs every lane off one consumer group until stopped (or until caught up)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: RunnerSettings,
        registry: EventRegistry,
        lanes: Sequence[Lane],
        *,
        dead_letters: DeadLetterStore,
        checkpoints: CheckpointStore,
        observer: LaneObserver | None = None,
    ) -> None:
        if len({lane.name for lane in lanes}) != len(lanes):
            raise ConfigurationError("two projections share a name")
        self._kafka = kafka
        self._settings = settings
        self._registry = registry
        self.lanes = list(lanes)
        self._dead_letters = dead_letters
        self._checkpoints = checkpoints
        self._observer = observer
        self._consumer: AIOKafkaConsumer | None = None
        self._dispatched: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._lane_tasks: list[asyncio.Task[None]] = []
        self._catch_ups = CatchUps(
            kafka,
            settings,
            checkpoints,
            dispatched=self._dispatched,
            decode=functools.partial(self._decode, record_poison=False),
        )
        self._decoder = Decoder(registry, dead_letters, settings)

    # -- life cycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, until_caught_up: bool = False) -> None:
        """Consume and apply until ``stop`` is set, or (burst mode) until caught up."""
        try:
            consumer = await self._start_consumer(stop)
        except StartupStopped:
            log.info("projection daemon stopped before it started consuming")
            return
        self._consumer = consumer
        self._lane_tasks = [asyncio.create_task(lane.run(), name=lane.name) for lane in self.lanes]
        observing = asyncio.create_task(self._observe(), name="lane observer")
        try:
            await self._loop(consumer, stop, until_caught_up=until_caught_up)
        finally:
            # Its last words (the daemon's rows deleted) go before the resources close.
            observing.cancel()
            await asyncio.wait({observing}, timeout=self._settings.shutdown_timeout_s)
            await asyncio.shield(self._shutdown(consumer))

    async def _start_consumer(self, stop: asyncio.Event) -> AIOKafkaConsumer:
        """The group's consumer, started; Kafka out of reach is waited out until ``stop``."""

        async def start() -> AIOKafkaConsumer:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._kafka.bootstrap_servers,
                group_id=self._settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self._settings.batch_size,
                max_partition_fetch_bytes=self._settings.fetch_partition_bytes,
                request_timeout_ms=int(self._kafka.request_timeout_s * 1000),
                session_timeout_ms=int(self._settings.session_timeout_s * 1000),
                heartbeat_interval_ms=int(self._settings.session_timeout_s * 1000 / 3),
            )
            consumer.subscribe([self._kafka.topic], listener=_Listener(self, consumer))
            try:
                with kafka_errors(kafka_address(self._kafka)):
                    await consumer.start()
            except BaseException:
                await consumer.stop()  # a failed start leaves connections behind
                raise
            return consumer

        async def note(exc: Exception) -> None:
            if stop.is_set():
                raise StartupStopped("asked to stop while waiting for Kafka") from exc
            log.warning("waiting for Kafka to start consuming: %s", exc)

        backoff = Backoff(self._settings.backoff_initial_s, self._settings.backoff_max_s)
        return await retrying(start, backoff, on_failure=note)

    async def _observe(self) -> None:
        if self._observer is None:
            return
        try:
            await self._observer.watch(self)
        except Exception:
            log.exception("the lane observer failed; the daemon goes on without it")

    @property
    def catching_up(self) -> frozenset[str]:
        """The lanes catching up alone right now (detached, not stranded)."""
        return self._catch_ups.running

    @property
    def stranded(self) -> Mapping[str, str]:
        """Lanes whose next offset the topic's retention deleted: stopped, with the reason."""
        return self._catch_ups.stranded

    async def _loop(
        self, consumer: AIOKafkaConsumer, stop: asyncio.Event, *, until_caught_up: bool
    ) -> None:
        while not stop.is_set():
            self._check_lanes_alive()
            records: Records = await consumer.getmany(
                timeout_ms=self._settings.max_latency_ms, max_records=self._settings.batch_size
            )
            if records:
                batch = await self._decode(records, record_poison=True)
                await self._dispatch(batch)
            await self._commit()
            if until_caught_up and self.stranded:
                # Burst mode cannot reach "caught up" any more: say why instead of hanging.
                raise ConfigurationError("; ".join(self.stranded.values()))
            if until_caught_up and not records and await self._caught_up(consumer):
                return

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        await self._flush(self._settings.shutdown_timeout_s)
        await self._catch_ups.stop(timeout_s=None)
        for task in self._lane_tasks:
            task.cancel()
        await asyncio.gather(*self._lane_tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._commit()
        committed = dict(self._committed)  # stopping revokes the partitions, which forgets them
        await consumer.stop()
        for lane in self.lanes:
            await lane.close()
        log.info("projection daemon stopped; offsets committed: %s", committed)

    def _check_lanes_alive(self) -> None:
        for task in self._lane_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"lane {task.get_name()} crashed") from task.exception()

    # -- decoding and dispatch --------------------------------------------------------

    async def _decode(self, records: Records, *, record_poison: bool) -> Batch:
        if not record_poison:  # a catch-up re-reads what the dispatcher already checked
            return self._decoder.decode(records).batch
        decoded = self._decoder.decode(records, check_gaps=True)
        if decoded.poison:
            await self._decoder.record(decoded.poison)
            for lane in self.lanes:  # before any lane gets the batch (engine.parking)
                lane.parked.note(decoded.parked)
        return decoded.batch

    async def _dispatch(self, batch: Batch) -> None:
        """Give the batch to every attached lane; a full queue is back-pressure or a detach."""
        for delivery in batch:
            self._dispatched[delivery.tp] = max(
                self._dispatched.get(delivery.tp, 0), delivery.offset + 1
            )
        full: list[Lane] = []
        for lane in self.lanes:
            lane.note_start(batch)
            if lane.detached:
                continue
            try:
                lane.queue.put_nowait(batch)
            except asyncio.QueueFull:
                if lane.failing:
                    self._detach(lane, lane.failing)
                else:
                    full.append(lane)
        await asyncio.gather(*(self._put_or_detach(lane, batch) for lane in full))

    async def _put_or_detach(self, lane: Lane, batch: Batch) -> None:
        """Wait for room in a full queue while the lane's store keeps answering.

        Each slot frees when the lane finishes a batch, so a busy store sets
        the pace (back-pressure). The wait ends in a detach when the store
        answers with errors (failing), has left one call unanswered for
        ``stall_timeout_s`` (hung), or the wait passes ``slow_lane_timeout_s``.
        """
        started = time.monotonic()
        put = asyncio.ensure_future(lane.queue.put(batch))
        try:
            while not put.done():
                reason, wake_in = self._hold_reason(lane, time.monotonic() - started)
                if reason is not None:
                    put.cancel()
                    self._detach(lane, reason)
                    return
                await asyncio.wait({put}, timeout=wake_in)
        finally:
            if not put.done():  # cancelled while waiting (shutdown): leave no putter behind
                put.cancel()

    def _hold_reason(self, lane: Lane, waited_s: float) -> tuple[str | None, float]:
        """Why to stop holding the dispatcher for ``lane`` (None: keep waiting), and how long."""
        settings = self._settings
        if lane.failing:
            return lane.failing, 0.0
        if waited_s >= settings.slow_lane_timeout_s:
            return f"slow store: no room in its queue for {waited_s:.0f}s", 0.0
        check_in = min(settings.slow_lane_timeout_s - waited_s, settings.stall_timeout_s / 4)
        since = lane.waiting_since
        if since is not None:
            silent = time.monotonic() - since
            if silent >= settings.stall_timeout_s:
                return f"hung store: no answer for {silent:.1f}s", 0.0
            check_in = min(check_in, settings.stall_timeout_s - silent)
        return None, check_in

    def _detach(self, lane: Lane, reason: str) -> None:
        log.warning("%s detached (%s); it will catch up alone", lane.name, reason)
        lane.detached = True
        lane.detached_because = reason
        while not lane.queue.empty():
            lane.queue.get_nowait()
            lane.queue.task_done()
        self._catch_ups.start(lane)

    # -- offsets ----------------------------------------------------------------------

    def safe_offsets(
        self, partitions: Sequence[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """Per partition, the lowest offset some lane has not finished."""
        wanted = partitions if partitions is not None else list(self._dispatched)
        safe: dict[TopicPartition, int] = {}
        for tp in wanted:
            offsets = [lane.commit_offset(tp) for lane in self.lanes]
            if all(o is not None for o in offsets):
                safe[tp] = min(o for o in offsets if o is not None)
        return safe

    async def _commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        fresh = {
            tp: OffsetAndMetadata(offset, "")
            for tp, offset in self.safe_offsets(partitions).items()
            if tp in assigned and offset > self._committed.get(tp, -1)
        }
        if fresh:
            try:
                await consumer.commit(fresh)
            except _STALE_COMMIT as exc:
                log.warning("commit refused by a rebalance (%s); the next one carries it", exc)
                return
            for tp, meta in fresh.items():
                self._committed[tp] = meta.offset

    async def _flush(self, timeout_s: float) -> None:
        """Let attached lanes finish what they were given, for at most ``timeout_s``.

        A lane whose store answers with errors or has left a call unanswered
        for ``stall_timeout_s`` is detached instead of waited for: before a
        rebalance, waiting for it would hold the whole group (the group waits
        for this daemon's revoke, up to its session timeout, which then evicts
        the daemon); at shutdown it would only delay the end. Its offsets stay
        where it left them, so what it had not finished is read again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attached = [lane for lane in self.lanes if not lane.detached]
        joins = {lane: asyncio.ensure_future(lane.queue.join()) for lane in attached}
        try:
            while joins:
                for lane, join in list(joins.items()):
                    reason = None if join.done() else self._hold_reason(lane, 0.0)[0]
                    if join.done() or reason is not None:
                        del joins[lane]
                        join.cancel()
                    if reason is not None:
                        self._detach(lane, reason)
                left = deadline - loop.time()
                if not joins:
                    return
                if left <= 0:
                    log.warning(
                        "lanes did not finish within %.0fs; committing what is safe", timeout_s
                    )
                    return
                await asyncio.wait(
                    joins.values(), timeout=min(left, self._settings.stall_timeout_s / 4)
                )
        finally:
            for join in joins.values():
                join.cancel()

    async def revoke(self, revoked: Sequence[TopicPartition]) -> None:
        """Before partitions move to another daemon: flush, commit, forget them.

        Catch-ups are stopped (they read partitions that may move) and waited
        for, bounded; afterwards every lane that is still detached gets a
        fresh one: what decides is the lane's state, not which tasks survived.
        """
        await self._catch_ups.stop(timeout_s=self._settings.shutdown_timeout_s)
        await self._flush(self._settings.shutdown_timeout_s)
        with contextlib.suppress(Exception):
            await self._commit(revoked)
        self._decoder.gaps.forget(revoked)
        for lane in self.lanes:  # documents of partitions that may move: not ours to know
            lane.forget_cached()
        for tp in revoked:
            self._dispatched.pop(tp, None)
            self._committed.pop(tp, None)
            for lane in self.lanes:
                lane.next_offset.pop(tp, None)
                lane.unconfirmed_from.pop(tp, None)
        for lane in self.lanes:
            if not lane.detached or lane.name in self.stranded:
                continue
            if self._catch_ups.behind(lane):
                self._catch_ups.start(lane)
            else:  # nothing of its own left behind: it follows the dispatcher again
                self._catch_ups.cancel(lane)
                lane.detached = False

    async def check_retention(
        self, consumer: AIOKafkaConsumer, assigned: Sequence[TopicPartition]
    ) -> None:
        """Strand the lanes whose next events on these partitions the retention deleted.

        Called when partitions are assigned, before anything is fetched from them
        (see the module docstring: a group offset overtaken by retention).
        """
        if not assigned:
            return
        starts = await consumer.beginning_offsets(list(assigned))
        # The partitions whose group offset is below the log's start, or missing (a new
        # group, or offsets Kafka expired): the consumer would jump to the start.
        jumping: dict[TopicPartition, int | None] = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            if starts[tp] > 0 and (committed is None or committed < starts[tp]):
                jumping[tp] = committed
        if not jumping:
            return
        topic = self._kafka.topic
        for lane in self.lanes:
            recorded = {
                p.partition: p.next_offset
                for p in await self._checkpoints.progress(lane.name, topic)
            }
            gone = {
                tp: place
                for tp, committed in jumping.items()
                if (place := _place(committed, recorded.get(tp.partition))) is not None
                and place < starts[tp]
            }
            if not gone:
                continue
            # Its place in the commit minimum: after the rebuild, a restart reads again
            # from the log's start, as after a catch-up that found its offsets gone.
            lane.next_offset.update(gone)
            if lane.name not in self.stranded:
                await self._catch_ups.strand(
                    lane,
                    gone,
                    "the group's committed offset is below the log's start, or missing",
                )

    async def _caught_up(self, consumer: AIOKafkaConsumer) -> bool:
        assigned = consumer.assignment()
        if not assigned or any(lane.detached or not lane.idle for lane in self.lanes):
            return False
        ends = await consumer.end_offsets(list(assigned))
        safe = self.safe_offsets(list(assigned))
        for tp, end in ends.items():
            if tp in self._dispatched:
                reached = safe.get(tp, 0)
            else:  # nothing new this run: where the group's committed offset left us
                reached = await consumer.position(tp)
            if reached < end:
                return False
        return True


def _place(committed: int | None, recorded: int | None) -> int | None:
    """Where a lane stands on a partition: the further of the group's offset (the minimum
    over the lanes, so never above the lane's own place) and its recorded progress (best
    effort, so maybe behind). None: neither is known, as for a new projection, which cannot
    be told from one that lost its place."""
    if committed is None:
        return recorded
    if recorded is None:
        return committed
    return max(committed, recorded)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ProjectionRunner, consumer: AIOKafkaConsumer) -> None:
        self._runner = runner
        self._consumer = consumer  # the first assignment can come before the runner has it

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(revoked))
            await self._runner.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        for lane in self._runner.lanes:
            # Another daemon may have parked aggregates on these partitions.
            lane.parked.forget()
        # aiokafka may fetch from the new partitions while this callback awaits (its
        # issue #738): held until the check has stranded whichever lane it must.
        self._consumer.pause(*assigned)
        try:
            await self._runner.check_retention(self._consumer, sorted(assigned))
        except Exception as exc:
            log.error(
                "could not compare the group's offsets with the log's start (%s): an offset the"
                " retention overtook goes unnoticed until the next assignment",
                exc,
            )
        finally:
            self._consumer.resume(*assigned)
