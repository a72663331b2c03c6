"""A lane: one projection, its store, its queue of batches and its progress per partition.

Each lane applies batches on its own task, so a slow or failing store holds
back only its own lane. Failures are handled by kind:

- a :class:`TransientError` (the store is down or slow) is retried with
  capped, jittered backoff for as long as it takes: an outage is not the
  event's fault, so it is never dead-lettered;
- anything else (a bug in the projection, a document the store rejects) is
  retried ``max_attempts`` times, then the batch is applied event by event and
  only the events that still fail are dead-lettered, so one bad event never
  blocks its partition.

A dead letter parks its aggregate: events of a parked aggregate are recorded
as letters parked behind the first one instead of being applied (see
:mod:`engine.parking` and :mod:`engine.postgres.deadletters`). An event the
lane itself dead-letters parks its aggregate for this projection, so the
aggregate's later events of the same batch, isolated one by one, are parked
too.

A Postgres outage pauses what needs Postgres and nothing else. A lane needs
Postgres for its store (a Postgres projection), for the generation fence of a
rebuildable store, to park or dead-letter an event, and to record progress.
When only the fence is out of reach (Postgres unreachable, *not* a fence held
by a rebuild), a lane whose own store still answers applies *unconfirmed*: to
the generation it last took up, keeping the applied events in memory
(bounded by ``unconfirmed_max_events``; past it, the lane waits like the
others). Unconfirmed work is claimed nowhere: the lane records no progress
(so no consistency token passes on it) and ``commit_offset`` stays at the
first unconfirmed offset (so a restart re-reads it). The first fence taken
afterwards confirms it: if the current generation is still the one written,
the work stands; if a rebuild switched meanwhile (it could, it does not see a
writer that holds no fence), the events are applied again, in order, to the
new generation before anything else. Stores apply idempotently by version, so
the events the rebuild's replay already covered change nothing, and the ones
after its bound, which only this lane applied, reach the new generation too.
Then the progress is recorded and the commit floor released. An event of a
parked aggregate, or one that must be dead-lettered, still waits for Postgres
(skipping it would lose it), as does a lane starting up or reloading its set
of parked aggregates.

``next_offset[tp]`` is the lowest offset of partition ``tp`` this lane has not
finished; the runner commits, per partition, the minimum over all lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import TopicPartition

from engine import metrics
from engine.deliveries import Batch, Delivery, dead_letter, later_progress, log_fields
from engine.errors import ServiceUnavailableError, TransientError
from engine.generations import GenerationFence, take_up
from engine.parking import ParkedAggregates
from engine.postgres.checkpoints import CheckpointStore, PartitionProgress
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from engine.projection import Projected, Projection, ProjectionStore, RebuildableStore
from engine.retry import Backoff, any_error, retrying
from engine.settings import RunnerSettings
from engine.stores.cache import CachingStore

log = logging.getLogger("engine.runner")


class Lane:
    """Applies batches to one projection's store, in order, on its own task."""

    def __init__(
        self,
        projection: Projection,
        store: ProjectionStore,
        *,
        settings: RunnerSettings,
        dead_letters: DeadLetterStore,
        checkpoints: CheckpointStore,
        fence: GenerationFence | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.projection = projection
        self.store = store
        self._fence = fence
        self._settings = settings
        self._dead_letters = dead_letters
        self._checkpoints = checkpoints
        self._jitter = jitter
        # The event types it takes, when ``wants`` is the default (a set look-up per
        # event instead of a method call: five lanes look at every event).
        self._handles = projection.handles if type(projection).wants is Projection.wants else None
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=settings.lane_queue_batches)
        self.next_offset: dict[TopicPartition, int] = {}
        self._detached = False
        # Monotonic time it was last detached (None: attached), for `engine status`: a
        # lane detached longer than stalled_after_s is stalled (engine.lane_state).
        self.detached_since: float | None = None
        # Why the runner detached it, for `engine status` (kept after it re-attached).
        self.detached_because: str | None = None
        self.failing: str | None = None
        self.applied = 0
        self.busy = False
        self.ready = asyncio.Event()  # set once the store is set up
        # Monotonic time since which a store call has gone unanswered (None: not waiting).
        # The runner detaches a lane whose store hangs by this, not by queue length.
        self.waiting_since: float | None = None
        # The generation this lane last set up and pointed readers at (None: none yet).
        self._taken_up: int | None = None
        self.parked = ParkedAggregates(projection.name, dead_letters, self._backoff)
        # Metric children bound once: the hot path pays one increment and one
        # observation per store call, never a label look-up (engine.metrics).
        self._applied_metric = metrics.EVENTS_APPLIED.labels(projection.name)
        self._dead_letter_metric = metrics.EVENTS_DEAD_LETTERED.labels(projection.name)
        self._apply_timer = metrics.BATCH_APPLY_SECONDS.labels(
            projection.name, metrics.store_kind(store)
        )
        # Applied without the fence while Postgres was unreachable (module doc): the
        # events, in order, the generation they went to, and per partition the first
        # offset not confirmed, which Kafka commits must not pass.
        self._unconfirmed: list[Projected] = []
        self._unconfirmed_generation: int | None = None
        self._fence_retry_at = 0.0  # while unconfirmed: when to try the fence again
        self.unconfirmed_from: dict[TopicPartition, int] = {}
        # Progress not recorded yet (unconfirmed, or the write failed): recorded with
        # the next batch that may record, so no partition's record stays behind.
        self._unrecorded: dict[TopicPartition, PartitionProgress] = {}
        self._unrecorded_changed = 0

    @property
    def name(self) -> str:
        return self.projection.name

    @property
    def detached(self) -> bool:
        """Left behind by the dispatcher: catching up alone, or stranded (see the runner)."""
        return self._detached

    @detached.setter
    def detached(self, detached: bool) -> None:
        # Detaching an already detached lane (a rebalance restarting its catch-up) keeps
        # the first time: it has not followed the dispatcher since.
        if detached and not self._detached:
            self.detached_since = time.monotonic()
        elif not detached:
            self.detached_since = None
        self._detached = detached

    @property
    def idle(self) -> bool:
        return not self.busy and self.queue.empty()

    def commit_offset(self, tp: TopicPartition) -> int | None:
        """How far Kafka may commit ``tp`` for this lane: not past unconfirmed work."""
        offset = self.next_offset.get(tp)
        unconfirmed = self.unconfirmed_from.get(tp)
        if offset is None or unconfirmed is None:
            return offset
        return min(offset, unconfirmed)

    def note_start(self, batch: Batch) -> None:
        """Remember the first offset of each partition this lane is responsible for."""
        for delivery in batch:
            self.next_offset.setdefault(delivery.tp, delivery.offset)

    async def run(self) -> None:
        """Set the store up, then take batches from the queue for ever (the runner cancels it)."""
        await self._setup()
        while True:
            if self._unconfirmed or self._unrecorded:
                # Idle with work to settle: without new events it would wait for ever.
                try:
                    batch = await asyncio.wait_for(
                        self.queue.get(), timeout=self._settings.backoff_max_s
                    )
                except TimeoutError:
                    await self._settle()
                    continue
            else:
                batch = await self.queue.get()
            batches = [batch]
            # Behind (more batches waiting): apply them together, so the per-apply
            # round trips (fence, transaction, progress) are paid once for all of them.
            # When the lane keeps up, the queue is empty here and nothing waits longer.
            events = len(batch)
            while events < self._settings.max_apply_events and not self.queue.empty():
                batches.append(self.queue.get_nowait())
                events += len(batches[-1])
            self.busy = True
            try:
                await self.process(batch if len(batches) == 1 else Batch.joined(batches))
            finally:
                self.busy = False
                for _ in batches:
                    self.queue.task_done()

    async def _setup(self) -> None:
        """Create the store's tables or index; a store that is down is waited for, alone.

        A rebuildable store is set up by taking up its current generation,
        which also repairs readers' pointers a crashed rebuild left behind.
        """

        async def set_up() -> None:
            self.waiting_since = time.monotonic()  # a set-up that hangs is a hung store too
            try:
                async with self._current_store() as (store, _):
                    if self._taken_up is None:  # not rebuildable: nothing took it up
                        await store.setup()
            finally:
                self.waiting_since = None

        await retrying(set_up, self._backoff(), retry_if=any_error, on_failure=self._note_failure)
        if self.failing is not None:
            # Set up after a failure: say it is over (before ready, so it is on record
            # before anything else of the lane's can be observed).
            self.failing = None
            await _best_effort(self._checkpoints.recovered(self.name))
        self.ready.set()

    async def process(self, batch: Batch) -> None:
        handles = self._handles
        if handles is not None:
            wanted = [
                d for d in batch if d.item is not None and d.item.envelope.event_type in handles
            ]
        else:
            wanted = [
                d for d in batch if d.item is not None and self.projection.wants(d.item.envelope)
            ]
        wanted = await self.parked.hold(wanted)
        changed = await self._apply(wanted) if wanted else 0
        if wanted and log.isEnabledFor(logging.DEBUG):  # checked per batch, not per event
            self._log_applied(wanted)
        for delivery in batch:
            done = delivery.offset + 1
            if self.next_offset.get(delivery.tp, -1) < done:
                self.next_offset[delivery.tp] = done
        # Events this projection does not handle count as done too: a reader
        # waiting for one of them must not wait for ever.
        self._note_progress(batch.progress, changed)
        if self._unconfirmed and time.monotonic() >= self._fence_retry_at:
            # Also when this batch needed no write: a lane that handles none of a
            # steady stream's events would otherwise confirm only once idle.
            await self._try_confirm()
        if self._unconfirmed:
            for delivery in batch:
                self.unconfirmed_from.setdefault(delivery.tp, delivery.offset)
            return
        self.unconfirmed_from.clear()
        await self._record_progress()

    async def _settle(self) -> None:
        """Confirm unconfirmed work and record progress, between batches (module doc)."""
        if self.detached:  # its catch-up settles them, with the events it applies
            return
        self.busy = True
        try:
            if self._unconfirmed and not await self._try_confirm():
                return
            self.unconfirmed_from.clear()
            await self._record_progress()
        finally:
            self.busy = False

    async def _try_confirm(self) -> bool:
        """Take the fence once, which confirms unconfirmed work; whether it is confirmed."""
        self._fence_retry_at = 0.0  # this is the time to try again
        try:
            async with self._current_store() as (_, confirmed):
                pass
        except Exception as exc:
            log.debug("%s: cannot confirm yet: %s", self.name, exc)
            return False
        return confirmed

    def _note_progress(self, progress: Sequence[PartitionProgress], changed: int) -> None:
        for p in progress:
            tp = TopicPartition(p.topic, p.partition)
            seen = self._unrecorded.get(tp)
            self._unrecorded[tp] = p if seen is None else later_progress(seen, p)
        self._unrecorded_changed += changed

    async def _record_progress(self) -> None:
        """Record every partition's progress not recorded yet (best effort, kept if it fails)."""
        if not self._unrecorded:
            return
        progress, changed = list(self._unrecorded.values()), self._unrecorded_changed
        try:
            await self._checkpoints.advance(self.name, progress, changed)
        except Exception as exc:  # for operators; the next batch records it
            log.debug("%s: progress not recorded yet: %s", self.name, exc)
            return
        for p in progress:
            tp = TopicPartition(p.topic, p.partition)
            if self._unrecorded.get(tp) is p:
                del self._unrecorded[tp]
        self._unrecorded_changed -= changed

    async def _apply(self, deliveries: list[Delivery]) -> int:
        """Apply ``deliveries``; the number of changes the store made."""
        attempts = 0

        def worth_retrying(exc: Exception) -> bool:
            # An outage is waited out for ever and counts for nothing; anything
            # else is the projection's own code (a bug or a poison event), which
            # gets max_attempts tries in all before the batch is taken apart.
            nonlocal attempts
            if isinstance(exc, TransientError):
                return True
            attempts += 1
            return attempts < self._settings.max_attempts

        items = [d.item for d in deliveries if d.item]
        try:
            changed = await retrying(
                functools.partial(self._store_apply, items),
                self._backoff(),
                retry_if=worth_retrying,
                on_failure=self._note_failure,
            )
        except Exception as exc:  # the last of max_attempts failures that were not outages
            await self._note_failure(exc)
            return await self._isolate_poison(deliveries, attempts)
        self._done(changed)
        return changed

    def _log_applied(self, deliveries: list[Delivery]) -> None:
        """At debug level, one line per event applied (or skipped as seen): to follow one."""
        for delivery in deliveries:
            if delivery.item is not None:
                envelope = delivery.item.envelope
                log.debug(
                    "%s: applied %s %s v%d (partition %d, offset %d)",
                    self.name,
                    envelope.event_type,
                    envelope.aggregate_id,
                    envelope.aggregate_version,
                    delivery.tp.partition,
                    delivery.offset,
                    extra=log_fields(delivery, self.name),
                )

    async def _isolate_poison(self, deliveries: list[Delivery], attempts: int) -> int:
        """Apply one event at a time; dead-letter exactly the ones that still fail."""
        total = 0
        for delivery in deliveries:
            # An event dead-lettered just before may have parked this one's aggregate.
            if not await self.parked.hold([delivery]):
                continue
            items = [delivery.item] if delivery.item else []
            try:
                # Only an outage is retried here: the event already had its attempts.
                changed = await retrying(
                    functools.partial(self._store_apply, items),
                    self._backoff(),
                    on_failure=self._note_failure,
                )
            except Exception as exc:
                log.error(
                    "%s: dead-lettering offset %s of %s: %s",
                    self.name,
                    delivery.offset,
                    delivery.tp,
                    exc,
                    extra=log_fields(delivery, self.name),
                )
                await self._record(dead_letter(delivery, self.name, exc, attempts))
            else:
                self._done(changed)
                total += changed
        return total

    async def _store_apply(self, items: list[Projected]) -> int:
        self.waiting_since = started = time.monotonic()
        try:
            async with self._current_store() as (store, confirmed):
                changed = await store.apply(items)
            if not confirmed:
                self._unconfirmed.extend(items)
            return changed
        finally:  # an answer, even an error, is progress: the store is not hung
            self.waiting_since = None
            self._apply_timer.observe(time.monotonic() - started)

    @asynccontextmanager
    async def _current_store(self) -> AsyncIterator[tuple[ProjectionStore, bool]]:
        """The store of the current generation, held inside the rebuild fence; and whether fenced.

        The generation is read from the database under the fence for every
        write; when it differs from the one this lane last took up (or at
        start), the lane takes it up: sets it up and points readers at it. A
        fence that cannot be taken raises TransientError: no write happens,
        except when only Postgres is out of reach and the lane may go on
        unconfirmed (module doc), which yields ``False``.
        """
        store = self.store
        if self._fence is None or not isinstance(store, RebuildableStore):
            yield store, True
            return
        async with contextlib.AsyncExitStack() as fence:
            # Known out of reach a moment ago: no connect timeout on every batch.
            skip = time.monotonic() < self._fence_retry_at and self._may_go_unconfirmed()
            try:
                if skip:
                    raise ServiceUnavailableError("PostgreSQL", "(the generation fence)")
                fenced = await fence.enter_async_context(self._fence.hold())
            except ServiceUnavailableError as exc:
                if not self._may_go_unconfirmed():
                    raise
                if not skip:
                    self._fence_retry_at = time.monotonic() + self._settings.backoff_max_s
                if not self._unconfirmed:
                    log.warning(
                        "%s: applying unconfirmed to generation %s: %s",
                        self.name,
                        self._taken_up,
                        exc,
                    )
                self._unconfirmed_generation = self._taken_up
                yield store, False
                return
            if fenced.generation != self._taken_up:
                if self._taken_up is not None:
                    log.info("%s: switching to generation %d", self.name, fenced.generation)
                self.store = store = await take_up(store, fenced)
                self._taken_up = fenced.generation
            await self._confirm(store, fenced.generation)
            yield store, True

    def _may_go_unconfirmed(self) -> bool:
        return (
            self._taken_up is not None
            and len(self._unconfirmed) < self._settings.unconfirmed_max_events
        )

    async def _confirm(self, store: ProjectionStore, generation: int) -> None:
        """Under the fence: settle what was applied without it (module doc)."""
        if not self._unconfirmed:
            return
        if generation != self._unconfirmed_generation:
            log.warning(
                "%s: generation %s was switched to %d while Postgres was unreachable;"
                " applying %d unconfirmed event(s) again to it",
                self.name,
                self._unconfirmed_generation,
                generation,
                len(self._unconfirmed),
            )
            try:
                await store.apply(self._unconfirmed)
            except TransientError:
                raise
            except Exception as exc:  # not the event in hand's fault: retry, never dead-letter
                raise TransientError(
                    f"cannot apply unconfirmed events again: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            log.info("%s: %d unconfirmed event(s) confirmed", self.name, len(self._unconfirmed))
        self._unconfirmed.clear()
        self._unconfirmed_generation = None

    def forget_cached(self) -> None:
        """Empty the store's document cache, if it has one (partitions are moving)."""
        if isinstance(self.store, CachingStore):
            self.store.forget_cached()

    async def close(self) -> None:
        if self._fence is not None:
            await self._fence.close()
        await self.store.close()

    async def _record(self, letter: NewDeadLetter) -> None:
        """Record a dead letter, waiting out a Postgres outage: skipping it silently is loss."""

        async def warn(exc: Exception) -> None:
            log.warning("%s: cannot record a dead letter yet: %s", self.name, exc)

        await retrying(
            functools.partial(self._dead_letters.record, [letter]),
            self._backoff(),
            retry_if=any_error,
            on_failure=warn,
        )
        self._dead_letter_metric.inc()
        if letter.aggregate_id is not None and letter.aggregate_version is not None:
            self.parked.note([letter.aggregate_id])  # the letter parked its aggregate

    def _backoff(self) -> Backoff:
        """A fresh backoff for one retried step (each starts short)."""
        return Backoff(
            self._settings.backoff_initial_s, self._settings.backoff_max_s, jitter=self._jitter
        )

    async def _note_failure(self, exc: BaseException) -> None:
        self.failing = f"{type(exc).__name__}: {exc}"
        log.warning("%s: %s (retrying)", self.name, self.failing)
        await _best_effort(self._checkpoints.failed(self.name, self.failing))

    def _done(self, changed: int) -> None:
        self.failing = None
        self.applied += changed
        self._applied_metric.inc(changed)


async def _best_effort(step: Any) -> None:
    """Checkpoints are for operators; losing one (Postgres blip) must not stop a lane."""
    try:
        await step
    except Exception as exc:
        log.debug("checkpoint not written: %s", exc)
