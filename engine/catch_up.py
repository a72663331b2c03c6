"""A detached lane catching up alone, from its own offsets, until it reaches the dispatcher.

Why a detached lane always catches up. A lane is detached exactly while it has
a catch-up task (in :class:`CatchUps`) or is stranded (below), and both ways out
hold whatever await a cancellation lands on:

- ``CatchUps._run`` does every await (``lane.ready``, ``lane.queue.join()``,
  ``reader.start()``, the reads) inside one ``try`` whose ``finally`` removes
  the task's own entry (only its own: a newer catch-up of the same lane may
  have replaced it) and closes the reader;
- the runner's ``revoke`` stops every catch-up, waits for them (bounded), and then
  starts a fresh one for *every* lane still detached and behind (or
  re-attaches one with nothing left behind). It decides by the lane's state,
  never by which tasks happen to be running: an entry left by a
  cancelled task can no longer keep a lane detached for ever, which used to
  freeze that projection, the commit minimum of every partition, and
  ``--until-caught-up``.

A lane the topic's retention overtook. The catch-up reader never resets
(``auto_offset_reset="none"``): when the lane's next offset is gone, skipping
to the log's start or end would leave a silent gap in its read model. Kafka
answers OffsetOutOfRange instead; the lane is *stranded*: it stays detached,
``failing`` (and its checkpoint's last error) names the projection, the
partition and offset and says to run ``engine rebuild <projection>`` and then
restart the daemon; the other lanes go on. It keeps its place in the commit
minimum, so after the rebuild a restart re-reads from the log's start and the
events committed after the rebuild's switch still reach it (they are recent,
so not deleted). In burst mode (``until_caught_up``) a stranded lane makes
``run`` raise with that message: "caught up" can no longer be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

from engine.deliveries import Batch
from engine.lane import Lane
from engine.postgres.checkpoints import CheckpointStore
from engine.settings import KafkaSettings, RunnerSettings

log = logging.getLogger("engine.runner")

Records = Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]


class CatchUps:
    """The catch-up task of each detached lane, and the lanes stranded by retention."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: RunnerSettings,
        checkpoints: CheckpointStore,
        *,
        dispatched: Mapping[TopicPartition, int],
        decode: Callable[[Records], Awaitable[Batch]],
    ) -> None:
        self._kafka = kafka
        self._settings = settings
        self._checkpoints = checkpoints
        self._dispatched = dispatched  # the dispatcher's next offset per partition (live)
        self._decode = decode
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.stranded: dict[str, str] = {}

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._tasks)

    def start(self, lane: Lane) -> None:
        """The one catch-up of ``lane``; an older one still unwinding is cancelled, not waited."""
        self.cancel(lane)
        self._tasks[lane.name] = asyncio.create_task(self._run(lane), name=f"catch-up {lane.name}")

    def cancel(self, lane: Lane) -> None:
        older = self._tasks.get(lane.name)
        if older is not None:
            older.cancel()

    async def stop(self, timeout_s: float | None) -> None:
        """Cancel every catch-up and wait for them (at most ``timeout_s``; None: until done)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def behind(self, lane: Lane) -> dict[TopicPartition, int]:
        """Where ``lane`` stands on each partition it has not caught up on."""
        return {
            tp: lane.next_offset[tp]
            for tp, dispatched in self._dispatched.items()
            if tp in lane.next_offset and lane.next_offset[tp] < dispatched
        }

    async def _run(self, lane: Lane) -> None:
        """Re-read this lane's partitions from its own offsets until it reaches the dispatcher.

        Every await is inside the ``try``: wherever a rebalance or shutdown
        cancels it, its entry goes (if it is still this task's) and the
        reader is closed.
        """
        reader: AIOKafkaConsumer | None = None
        try:
            await lane.ready.wait()
            await lane.queue.join()  # the batch in flight (maybe retrying) finishes first
            reader = AIOKafkaConsumer(
                bootstrap_servers=self._kafka.bootstrap_servers,
                group_id=None,
                enable_auto_commit=False,
                # Never jump: an offset the retention deleted is an error, not a reset.
                auto_offset_reset="none",
                max_poll_records=self._settings.batch_size,
                max_partition_fetch_bytes=self._settings.fetch_partition_bytes,
            )
            await reader.start()
            await self._read_until_reached(lane, reader)
            lane.detached = False  # no await since the check: the next dispatch is ours
            log.info("%s caught up and re-attached", lane.name)
        except (OffsetOutOfRangeError, NoOffsetForPartitionError) as exc:
            await self._strand(lane, exc)
        finally:
            if self._tasks.get(lane.name) is asyncio.current_task():
                del self._tasks[lane.name]
            if reader is not None:
                await reader.stop()

    async def _read_until_reached(self, lane: Lane, reader: AIOKafkaConsumer) -> None:
        reading: set[TopicPartition] = set()
        while behind := self.behind(lane):
            # Partitions fall behind one by one while detached: follow the current set,
            # always from the lane's own progress.
            if set(behind) != reading:
                reading = set(behind)
                reader.assign(list(reading))
                for tp, offset in behind.items():
                    reader.seek(tp, offset)
            records: Records = await reader.getmany(timeout_ms=self._settings.max_latency_ms)
            if records:
                await lane.process(await self._decode(records))

    async def _strand(self, lane: Lane, exc: Exception) -> None:
        await self.strand(lane, self.behind(lane), type(exc).__name__)

    async def strand(self, lane: Lane, gone: Mapping[TopicPartition, int], cause: str) -> None:
        """Stop a lane whose next events (from ``gone``) left the topic, and say what to do."""
        where = ", ".join(
            f"partition {tp.partition} from offset {offset}" for tp, offset in sorted(gone.items())
        )
        reason = (
            f"{lane.name} is stopped: the topic's retention deleted events it had not applied"
            f" yet ({where}; {cause}). Its read model has a gap that only a"
            f" rebuild can fill: run `engine rebuild {lane.name}`, then restart the daemon."
        )
        log.error(reason)
        self.stranded[lane.name] = reason
        lane.detached = True
        lane.detached_because = reason
        lane.failing = reason
        with contextlib.suppress(Exception):  # for operators (engine status); the log has it
            await self._checkpoints.failed(lane.name, reason)
