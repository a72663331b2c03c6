"""The projection daemon: one Kafka consumer group, fanned out to every projection's lane.

The dispatcher fetches a batch (up to ``batch_size`` records, waiting at most
``max_latency_ms``), decodes each message once (poison goes to the dead-letter
store for all projections, marked ``*``), and hands the batch to every lane.
Lanes apply concurrently; the dispatcher commits, per partition, the lowest
offset any lane has not finished, so an offset is committed only after every
projection durably applied (or dead-lettered) everything before it.

Failure isolation: a lane whose store is down falls behind until its queue is
full; then it is *detached*: its queued batches are dropped, it stops receiving
new ones, and, once its store accepts writes again, it catches up alone from
its own offsets with a private, group-less consumer, and re-attaches when it
reaches the dispatcher. Meanwhile the other lanes stay current. Commits never
pass a detached lane's offsets, so a restart or rebalance loses nothing; the
healthy lanes see those events again and skip them by version.

Rebalance: when partitions are revoked, queued work is flushed (bounded by
``shutdown_timeout_s``) and the safe offsets committed before the partitions
move. Shutdown does the same for everything, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from engine import codec
from engine.errors import ConfigurationError, EventDecodeError, PoisonError
from engine.lane import Batch, Delivery, Lane, dead_letter
from engine.postgres.deadletters import ALL_PROJECTIONS, DeadLetterStore, NewDeadLetter
from engine.projection import Projected
from engine.registry import EventRegistry
from engine.settings import KafkaSettings, RunnerSettings

log = logging.getLogger("engine.runner")

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class ProjectionRunner:
    """Runs every lane off one consumer group until stopped (or until caught up)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: RunnerSettings,
        registry: EventRegistry,
        lanes: Sequence[Lane],
        dead_letters: DeadLetterStore,
    ) -> None:
        if len({lane.name for lane in lanes}) != len(lanes):
            raise ConfigurationError("two projections share a name")
        self._kafka = kafka
        self._settings = settings
        self._registry = registry
        self.lanes = list(lanes)
        self._dead_letters = dead_letters
        self._consumer: AIOKafkaConsumer | None = None
        self._dispatched: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._lane_tasks: list[asyncio.Task[None]] = []
        self._catch_ups: dict[str, asyncio.Task[None]] = {}

    # -- life cycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, until_caught_up: bool = False) -> None:
        """Consume and apply until ``stop`` is set, or (burst mode) until caught up."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_servers,
            group_id=self._settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._settings.batch_size,
            request_timeout_ms=int(self._kafka.request_timeout_s * 1000),
        )
        consumer.subscribe([self._kafka.topic], listener=_Listener(self))
        await consumer.start()
        self._consumer = consumer
        self._lane_tasks = [asyncio.create_task(lane.run(), name=lane.name) for lane in self.lanes]
        try:
            await self._loop(consumer, stop, until_caught_up=until_caught_up)
        finally:
            await asyncio.shield(self._shutdown(consumer))

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
            if until_caught_up and not records and await self._caught_up(consumer):
                return

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        await self._flush(self._settings.shutdown_timeout_s)
        for task in [*self._catch_ups.values(), *self._lane_tasks]:
            task.cancel()
        await asyncio.gather(*self._catch_ups.values(), *self._lane_tasks, return_exceptions=True)
        self._catch_ups.clear()
        with contextlib.suppress(Exception):
            await self._commit()
        await consumer.stop()
        for lane in self.lanes:
            await lane.close()
        log.info("projection daemon stopped; offsets committed: %s", self._committed)

    def _check_lanes_alive(self) -> None:
        for task in self._lane_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"lane {task.get_name()} crashed") from task.exception()

    # -- decoding and dispatch --------------------------------------------------------

    async def _decode(self, records: Records, *, record_poison: bool) -> Batch:
        batch = Batch()
        poison: list[NewDeadLetter] = []
        for tp, messages in records.items():
            for message in messages:
                delivery = Delivery(
                    tp, message.offset, message.key, message.value, list(message.headers), None
                )
                try:
                    envelope = codec.decode(message.value)
                    event = self._registry.decode(envelope)
                except Exception as exc:
                    # Every failure to decode or validate is the message's, never the
                    # daemon's: a crash here would restart at this offset for ever.
                    if not isinstance(exc, PoisonError):
                        exc = EventDecodeError(f"{type(exc).__name__}: {exc}")
                    log.error("dead-lettering offset %s of %s: %s", message.offset, tp, exc)
                    poison.append(dead_letter(delivery, ALL_PROJECTIONS, exc, attempts=1))
                    batch.append(delivery)
                    continue
                batch.append(
                    Delivery(
                        tp,
                        message.offset,
                        message.key,
                        message.value,
                        delivery.headers,
                        Projected(envelope, event),
                    )
                )
        if record_poison and poison:
            await self._dead_letters.record(poison)
        return batch

    async def _dispatch(self, batch: Batch) -> None:
        """Give the batch to every attached lane.

        A full queue means the lane is behind. If its store is failing, it is
        detached at once; if it is only slower than the others, the dispatcher
        waits for it (back-pressure) up to ``slow_lane_timeout_s`` and then
        detaches it too, so one slow store cannot hold the others for long.
        """
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
                    self._detach(lane)
                else:
                    full.append(lane)
        await asyncio.gather(*(self._put_or_detach(lane, batch) for lane in full))

    async def _put_or_detach(self, lane: Lane, batch: Batch) -> None:
        try:
            await asyncio.wait_for(
                lane.queue.put(batch), timeout=self._settings.slow_lane_timeout_s
            )
        except TimeoutError:
            self._detach(lane)

    def _detach(self, lane: Lane) -> None:
        log.warning(
            "%s fell %d batches behind (%s); it will catch up alone",
            lane.name,
            lane.queue.maxsize,
            lane.failing or "slow store",
        )
        lane.detached = True
        while not lane.queue.empty():
            lane.queue.get_nowait()
            lane.queue.task_done()
        self._catch_ups[lane.name] = asyncio.create_task(self._catch_up(lane))

    async def _catch_up(self, lane: Lane) -> None:
        """Re-read this lane's partitions from its own offsets until it reaches the dispatcher."""
        await lane.ready.wait()
        await lane.queue.join()  # the batch in flight (maybe retrying) finishes first
        reader = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            max_poll_records=self._settings.batch_size,
        )
        await reader.start()
        try:
            reading: set[TopicPartition] = set()
            while behind := self._behind(lane):
                # Partitions fall behind one by one while detached: follow the current set,
                # always from the lane's own progress.
                if set(behind) != reading:
                    reading = set(behind)
                    reader.assign(list(reading))
                    for tp, offset in behind.items():
                        reader.seek(tp, offset)
                records: Records = await reader.getmany(timeout_ms=self._settings.max_latency_ms)
                if records:
                    await lane.process(await self._decode(records, record_poison=False))
            lane.detached = False  # no await since the check: the next dispatch is ours
            log.info("%s caught up and re-attached", lane.name)
        finally:
            self._catch_ups.pop(lane.name, None)
            await reader.stop()

    def _behind(self, lane: Lane) -> dict[TopicPartition, int]:
        return {
            tp: lane.next_offset[tp]
            for tp, dispatched in self._dispatched.items()
            if tp in lane.next_offset and lane.next_offset[tp] < dispatched
        }

    # -- offsets ----------------------------------------------------------------------

    def safe_offsets(
        self, partitions: Sequence[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """Per partition, the lowest offset some lane has not finished."""
        wanted = partitions if partitions is not None else list(self._dispatched)
        safe: dict[TopicPartition, int] = {}
        for tp in wanted:
            offsets = [lane.next_offset.get(tp) for lane in self.lanes]
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
            await consumer.commit(fresh)
            for tp, meta in fresh.items():
                self._committed[tp] = meta.offset

    async def _flush(self, timeout_s: float) -> None:
        """Let attached lanes finish what they were given, for at most ``timeout_s``."""
        joins = [lane.queue.join() for lane in self.lanes if not lane.detached]
        try:
            await asyncio.wait_for(asyncio.gather(*joins), timeout=timeout_s)
        except TimeoutError:
            log.warning("lanes did not finish within %.0fs; committing what is safe", timeout_s)

    async def revoke(self, revoked: Sequence[TopicPartition]) -> None:
        """Before partitions move to another daemon: flush, commit, forget them."""
        for task in list(self._catch_ups.values()):
            task.cancel()
        await self._flush(self._settings.shutdown_timeout_s)
        with contextlib.suppress(Exception):
            await self._commit(revoked)
        for tp in revoked:
            self._dispatched.pop(tp, None)
            self._committed.pop(tp, None)
            for lane in self.lanes:
                lane.next_offset.pop(tp, None)
        for lane in self.lanes:
            if lane.detached and lane.name not in self._catch_ups:
                if self._behind(lane):
                    self._catch_ups[lane.name] = asyncio.create_task(self._catch_up(lane))
                else:
                    lane.detached = False

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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ProjectionRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked: %s", sorted(revoked))
            await self._runner.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
