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

A dead letter parks its aggregate (see :mod:`engine.postgres.deadletters` for
the argument): before applying, the lane records the events of parked
aggregates that lie behind the hole as letters parked behind the first one,
and applies only the rest. An event the lane itself dead-letters parks its
aggregate for this projection, so the aggregate's later events of the same
batch, isolated one by one, are parked too. The check (one indexed query per
batch) and recording a parked letter wait out a Postgres outage like any dead
letter, so while Postgres is down every lane waits, whatever its store:
applying an event unchecked could fold it over a hole, and skipping it would
lose it.

``next_offset[tp]`` is the lowest offset of partition ``tp`` this lane has not
finished; the runner commits, per partition, the minimum over all lanes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition

from engine.errors import TransientError
from engine.generations import GenerationFence, take_up
from engine.postgres.checkpoints import CheckpointStore, PartitionProgress
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from engine.projection import Projected, Projection, ProjectionStore, RebuildableStore
from engine.retry import Backoff, any_error, retrying
from engine.settings import RunnerSettings

log = logging.getLogger("engine.runner")


@dataclass(frozen=True)
class Delivery:
    """One Kafka message as the runner received it; ``item`` is None for poison."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    item: Projected | None


class Batch(list[Delivery]):
    """The deliveries of one poll, shared by every lane (so computed once, not per lane)."""

    @functools.cached_property
    def progress(self) -> list[PartitionProgress]:
        return progress_of(self)


def aggregate_of(delivery: Delivery) -> tuple[str | None, int | None]:
    """The aggregate id and version of a message, as far as it tells them.

    A decoded envelope tells both. An undecodable message may still be a JSON
    object naming them (an unknown event type or schema version); otherwise
    the Kafka key names the aggregate and its version is unknown.
    """
    if delivery.item is not None:
        envelope = delivery.item.envelope
        return envelope.aggregate_id, envelope.aggregate_version
    try:
        body = json.loads(delivery.value or b"")
    except ValueError:
        body = None
    if isinstance(body, dict):
        aggregate_id, version = body.get("aggregate_id"), body.get("aggregate_version")
        if isinstance(aggregate_id, str) and type(version) is int:
            return aggregate_id, version
    key = delivery.key.decode(errors="replace") if delivery.key else None
    return key, None


def dead_letter(
    delivery: Delivery, projection: str, error: BaseException | str, attempts: int
) -> NewDeadLetter:
    headers = {k: v.decode(errors="replace") for k, v in delivery.headers}
    aggregate_id, version = aggregate_of(delivery)
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return NewDeadLetter(
        projection=projection,
        topic=delivery.tp.topic,
        partition=delivery.tp.partition,
        offset=delivery.offset,
        key=delivery.key,
        value=delivery.value,
        headers=headers,
        event_type=headers.get("event_type"),
        error=reason,
        attempts=attempts,
        aggregate_id=aggregate_id,
        aggregate_version=version,
    )


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
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=settings.lane_queue_batches)
        self.next_offset: dict[TopicPartition, int] = {}
        self.detached = False
        self.failing: str | None = None
        self.applied = 0
        self.busy = False
        self.ready = asyncio.Event()  # set once the store is set up
        # Monotonic time since which a store call has gone unanswered (None: not waiting).
        # The runner detaches a lane whose store hangs by this, not by queue length.
        self.waiting_since: float | None = None
        # The generation this lane last set up and pointed readers at (None: none yet).
        self._taken_up: int | None = None

    @property
    def name(self) -> str:
        return self.projection.name

    @property
    def idle(self) -> bool:
        return not self.busy and self.queue.empty()

    def note_start(self, batch: Batch) -> None:
        """Remember the first offset of each partition this lane is responsible for."""
        for delivery in batch:
            self.next_offset.setdefault(delivery.tp, delivery.offset)

    async def run(self) -> None:
        """Set the store up, then take batches from the queue for ever (the runner cancels it)."""
        await self._setup()
        while True:
            batch = await self.queue.get()
            self.busy = True
            try:
                await self.process(batch)
            finally:
                self.busy = False
                self.queue.task_done()

    async def _setup(self) -> None:
        """Create the store's tables or index; a store that is down is waited for, alone.

        A rebuildable store is set up by taking up its current generation,
        which also repairs readers' pointers a crashed rebuild left behind.
        """

        async def set_up() -> None:
            async with self._current_store() as store:
                if self._taken_up is None:  # not rebuildable: nothing took it up
                    await store.setup()

        await retrying(set_up, self._backoff(), retry_if=any_error, on_failure=self._note_failure)
        if self.failing is not None:
            # Set up after a failure: say it is over (before ready, so it is on record
            # before anything else of the lane's can be observed).
            self.failing = None
            await _best_effort(self._checkpoints.recovered(self.name))
        self.ready.set()

    async def process(self, batch: Batch) -> None:
        wanted = [d for d in batch if d.item is not None and self.projection.wants(d.item.envelope)]
        wanted = await self._hold_parked(wanted)
        changed = await self._apply(wanted) if wanted else 0
        for delivery in batch:
            done = delivery.offset + 1
            if self.next_offset.get(delivery.tp, -1) < done:
                self.next_offset[delivery.tp] = done
        # Events this projection does not handle count as done too: a reader
        # waiting for one of them must not wait for ever.
        await _best_effort(self._checkpoints.advance(self.name, batch.progress, changed))

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

    async def _isolate_poison(self, deliveries: list[Delivery], attempts: int) -> int:
        """Apply one event at a time; dead-letter exactly the ones that still fail."""
        total = 0
        for delivery in deliveries:
            # An event dead-lettered just before may have parked this one's aggregate.
            if not await self._hold_parked([delivery]):
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
                )
                await self._record(dead_letter(delivery, self.name, exc, attempts))
            else:
                self._done(changed)
                total += changed
        return total

    async def _hold_parked(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Park the deliveries behind a dead letter of their aggregate; the ones to apply."""
        if not deliveries:
            return deliveries
        ids = [aggregate_id for d in deliveries if (aggregate_id := aggregate_of(d)[0])]

        async def parked_ones() -> set[tuple[int, int]]:
            # Unlocked first: almost always nothing is parked, and absence cannot be
            # stale here (see engine.postgres.deadletters); presence is decided under lock.
            parked = await self._dead_letters.parked_aggregates(self.name, ids)
            candidates = [
                self._parked_letter(d) for d in deliveries if aggregate_of(d)[0] in parked
            ]
            return await self._dead_letters.park_behind(candidates)

        async def warn(exc: Exception) -> None:
            log.warning("%s: cannot check or record parked events yet: %s", self.name, exc)

        held = await retrying(parked_ones, self._backoff(), retry_if=any_error, on_failure=warn)
        if held:
            log.info("%s: parked %d event(s) behind dead letters", self.name, len(held))
        return [d for d in deliveries if (d.tp.partition, d.offset) not in held]

    def _parked_letter(self, delivery: Delivery) -> NewDeadLetter:
        aggregate_id, version = aggregate_of(delivery)
        return dead_letter(
            delivery,
            self.name,
            f"parked: {aggregate_id} has an earlier event dead-lettered (this is v{version})",
            attempts=0,
        )

    async def _store_apply(self, items: list[Projected]) -> int:
        self.waiting_since = time.monotonic()
        try:
            async with self._current_store() as store:
                return await store.apply(items)
        finally:  # an answer, even an error, is progress: the store is not hung
            self.waiting_since = None

    @asynccontextmanager
    async def _current_store(self) -> AsyncIterator[ProjectionStore]:
        """The store of the current generation, held inside the rebuild fence.

        The generation is read from the database under the fence for every
        write; when it differs from the one this lane last took up (or at
        start), the lane takes it up: sets it up and points readers at it. A
        fence that cannot be taken raises TransientError: no write happens.
        """
        store = self.store
        if self._fence is None or not isinstance(store, RebuildableStore):
            yield store
            return
        async with self._fence.hold() as fenced:
            if fenced.generation != self._taken_up:
                if self._taken_up is not None:
                    log.info("%s: switching to generation %d", self.name, fenced.generation)
                self.store = store = await take_up(store, fenced)
                self._taken_up = fenced.generation
            yield store

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


def progress_of(batch: Sequence[Delivery]) -> list[PartitionProgress]:
    """Per partition of ``batch``: the next offset and the highest position and time seen."""
    # (next offset, position, event time) per partition, as plain values: this runs
    # once per batch over every delivery, so it creates no object per delivery.
    seen: dict[TopicPartition, tuple[int, int, datetime | None]] = {}
    for delivery in batch:
        offset, position, event_at = seen.get(delivery.tp, (0, 0, None))
        if delivery.item is not None:
            envelope = delivery.item.envelope
            position = max(position, envelope.position)
            if event_at is None or envelope.occurred_at > event_at:
                event_at = envelope.occurred_at
        seen[delivery.tp] = (max(offset, delivery.offset + 1), position, event_at)
    return [
        PartitionProgress(tp.topic, tp.partition, offset, position, event_at)
        for tp, (offset, position, event_at) in seen.items()
    ]


async def _best_effort(step: Any) -> None:
    """Checkpoints are for operators; losing one (Postgres blip) must not stop a lane."""
    try:
        await step
    except Exception as exc:
        log.debug("checkpoint not written: %s", exc)
