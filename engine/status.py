"""Where each projection stands (state, position, lag, dead letters, parked aggregates, errors).

Cheap enough to answer on every ``GET /status``: a few indexed queries, one
metadata and two offset requests to Kafka and, only for partitions a
projection is behind on, one small fetch each.

Lag in events is counted in Kafka offsets, not in global positions: positions
interleave across partitions, while offsets are contiguous in each one (the
relay's idempotent, non-transactional producer writes no control records), so
``end offset - next offset`` is exactly the number of messages a projection
has not processed yet. The daemon records a partition's progress when a batch
finishes, so a caught-up projection shows 0.

Lag in seconds is the age of the oldest message a projection has not
processed: the Kafka timestamp (when the relay published it) of the record at
its next offset, on the lagging partition that waits longest. That is how old
the newest change a reader of the projection may be missing is. The age of the
newest *applied* event, which the progress rows hold, would be cheaper but
wrong for an idle partition: quiet for a day, it would show a day of lag on
its first new event. How long events wait in the outbox before they are
published is reported separately (``OutboxStatus``), with whether the relay is
stalled (events wait and it published nothing for ``relay.stalled_after_s``;
the rule and why it does not fire on a busy relay: :mod:`engine.relay_state`).

The state (attached, catching up, detached, stranded, parked, stalled, no
daemon) combines what each live daemon records about its lanes with the lag
and parked aggregates read here, worst first; :mod:`engine.projection_state` has the
rules and why a silent daemon's word no longer counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ConfigDict, computed_field

from engine.application import Application
from engine.drivers import (
    START_HINT,
    kafka_address,
    kafka_errors,
    postgres_address,
    postgres_errors,
)
from engine.generations import current_generation
from engine.lane_state import UNHEALTHY, LaneState, stale_after_s
from engine.postgres import outbox
from engine.postgres.checkpoints import Checkpoint, CheckpointStore, PartitionProgress
from engine.postgres.deadletters import DeadLetterStore, Parked
from engine.projection_state import Recorded, Waiting, projection_state, read_recorded
from engine.relay_state import relay_stall
from engine.resources import Resources
from engine.settings import KafkaSettings, RelaySettings, RunnerSettings, Settings
from engine.topics import topic_partitions

# Reading the first unprocessed record of a partition should take milliseconds;
# past this, its time is reported as unknown rather than holding the caller.
_RECORD_WAIT_S = 5.0
# Only the first record of each partition is wanted: do not prefetch a megabyte.
_FETCH_BYTES = 64 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)


class PartitionLag(_Model):
    """One projection on one partition of the event topic."""

    partition: int
    next_offset: int
    """The first offset the projection has not processed (the partition's first if none)."""
    end_offset: int
    """The offset the next message published to the partition will get."""
    oldest_unapplied_at: datetime | None = None
    """When the message at ``next_offset`` was published; None if caught up or not read in time."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lag_events(self) -> int:
        """Messages published to the partition that the projection has not processed."""
        return max(0, self.end_offset - self.next_offset)


class ParkedAggregate(_Model):
    """An aggregate whose events wait behind a dead letter (see ``engine dlq replay``)."""

    aggregate_id: str
    projection: str
    """The projection it is parked for; ``*`` when for every projection (undecodable event)."""
    version: int
    """The version of the dead-lettered event; later versions wait behind it."""
    first_letter: int
    """The id of that dead letter: replaying it replays the aggregate's sequence in order."""
    parked_letters: int
    """Later events recorded as dead letters behind it, not replayed yet."""
    reason: str
    parked_at: datetime


class ProjectionStatus(_Model):
    """How far one projection got, how far behind it is, and what went wrong."""

    name: str
    generation: int = 1
    """The generation of its store that readers and the daemon use (a rebuild makes the next)."""
    position: int = 0
    """The highest global event position processed (0: none yet)."""
    applied: int = 0
    """Changes the projection's store made, over its whole life."""
    updated_at: datetime | None = None
    """When the daemon last recorded a finished batch of this projection."""
    lag_seconds: float | None = 0.0
    """Seconds since the oldest message the projection has not processed was published to Kafka
    (on the lagging partition that waits longest); 0 when caught up; None when behind but that
    message could not be read in time. Time spent in the outbox is not included (see the outbox)."""
    dead_letters: int = 0
    """Dead letters not replayed yet: this projection's and those of every projection (``*``)."""
    last_error: str | None = None
    """The last failure the daemon recorded for this projection (it may since have recovered)."""
    last_error_at: datetime | None = None
    error_current: bool = False
    """True when nothing succeeded after the last error (no batch, no set-up): failing now."""
    recovered_at: datetime | None = None
    """When the daemon last recorded a success after ``last_error`` (a batch or a set-up);
    None while the error is current or if there was none."""
    partitions: list[PartitionLag] = []
    parked: list[ParkedAggregate] = []
    """Aggregates whose later events wait behind a dead letter, for this projection or ``*``."""
    state: LaneState = LaneState.NO_DAEMON
    """attached, catching up, detached, stranded, parked, stalled or no daemon: the worst of
    what the live daemons report for it and what its lag and dead letters show."""
    state_reason: str | None = None
    """Why it is in that state (the findings, worst first); None when plainly attached."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def parked_aggregates(self) -> int:
        """How many aggregates are parked (their events wait for ``engine dlq replay``)."""
        return len(self.parked)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lag_events(self) -> int:
        """Messages published to Kafka that the projection has not processed (all partitions)."""
        return sum(p.lag_events for p in self.partitions)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """No current error, no dead letter waiting, no aggregate parked, not stranded, stalled
        or detached; lag alone is no failure."""
        return (
            not self.error_current
            and self.dead_letters == 0
            and not self.parked
            and self.state not in UNHEALTHY
        )


class OutboxStatus(_Model):
    """Events committed but not yet published to Kafka by the relay."""

    unpublished: int
    oldest_age_seconds: float | None
    """Seconds since the first unpublished event (lowest position) occurred; None if none."""
    stalled: bool = False
    """Events wait and the relay has published nothing for ``relay.stalled_after_s``."""
    stalled_reason: str | None = None
    """Why it is stalled (how many wait, since when, the leader's lease); None if not."""


class EngineStatus(_Model):
    """Every projection of the application, and the outbox, at ``collected_at``."""

    collected_at: datetime
    topic: str
    projections: list[ProjectionStatus]
    outbox: OutboxStatus

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """Every projection is healthy and the relay is not stalled."""
        return all(p.healthy for p in self.projections) and not self.outbox.stalled


async def collect_status(
    settings: Settings, application: Application, resources: Resources
) -> EngineStatus:
    """The status of every projection of ``application``, and of the outbox.

    Reads Postgres (``resources.pool``) and Kafka (``settings.kafka``); a service
    that cannot be reached raises :class:`ServiceUnavailableError` naming it.
    """
    names = [projection.name for projection, _store in application.projections(resources)]
    # Postgres before Kafka: progress read first can only make the lag look larger, never
    # hide it.
    recorded = await _read_postgres(resources.pool, names, settings)
    lags = await _read_kafka(settings.kafka, recorded.progress)
    now = datetime.now(UTC)
    return EngineStatus(
        collected_at=now,
        topic=settings.kafka.topic,
        projections=[
            _with_state(
                _projection(
                    name,
                    recorded.checkpoints.get(name),
                    recorded.dead_letters[name],
                    lags[name],
                    now,
                ).model_copy(
                    update={
                        "generation": recorded.generations[name],
                        "parked": recorded.parked[name],
                    }
                ),
                recorded.lanes,
                settings.runner,
                now,
            )
            for name in names
        ],
        outbox=_outbox(recorded.backlog, settings.relay, now),
    )


def _outbox(backlog: outbox.Backlog, relay: RelaySettings, now: datetime) -> OutboxStatus:
    stalled = relay_stall(backlog, relay.stalled_after_s)
    return OutboxStatus(
        unpublished=backlog.count,
        oldest_age_seconds=_age(backlog.oldest_at, now),
        stalled=stalled is not None,
        stalled_reason=stalled,
    )


def _projection(
    name: str,
    checkpoint: Checkpoint | None,
    dead_letters: int,
    partitions: list[PartitionLag],
    now: datetime,
) -> ProjectionStatus:
    lag_seconds = _lag_seconds(partitions, now)
    if checkpoint is None:  # the daemon never finished a batch of it, nor failed
        return ProjectionStatus(
            name=name, lag_seconds=lag_seconds, dead_letters=dead_letters, partitions=partitions
        )
    # A failure before any finished batch creates the row with both times set to one now().
    never_finished = checkpoint.updated_at == checkpoint.last_error_at
    current = checkpoint.error_current
    return ProjectionStatus(
        name=name,
        position=checkpoint.last_position,
        applied=checkpoint.applied,
        updated_at=None if never_finished else checkpoint.updated_at,
        lag_seconds=lag_seconds,
        dead_letters=dead_letters,
        last_error=checkpoint.last_error,
        last_error_at=checkpoint.last_error_at,
        error_current=current,
        recovered_at=None if current else _recovered_at(checkpoint, never_finished),
        partitions=partitions,
    )


def _with_state(
    status: ProjectionStatus, lanes: Recorded, runner: RunnerSettings, now: datetime
) -> ProjectionStatus:
    """``status`` with its state: the daemons' rows, combined with its lag and parked aggregates."""
    ages = lanes.progress_ages[status.name]
    waiting = [
        Waiting(
            partition=p.partition,
            events=p.lag_events,
            waited_s=_age(p.oldest_unapplied_at, now),
            progress_age_s=ages.get(p.partition),
        )
        for p in status.partitions
    ]
    state, reason = projection_state(
        lanes.reports[status.name],
        waiting,
        parked=status.parked_aggregates,
        stale_after_s=stale_after_s(runner),
        stalled_after_s=runner.stalled_after_s,
    )
    return status.model_copy(update={"state": state, "state_reason": reason})


def _recovered_at(checkpoint: Checkpoint, never_finished: bool) -> datetime | None:
    """The latest success recorded after the last error (the error is not current)."""
    if checkpoint.last_error_at is None:
        return None
    successes = [checkpoint.recovered_at, None if never_finished else checkpoint.updated_at]
    after = [t for t in successes if t is not None and t > checkpoint.last_error_at]
    return max(after, default=None)


def _lag_seconds(partitions: Sequence[PartitionLag], now: datetime) -> float | None:
    lagging = [p for p in partitions if p.lag_events > 0]
    if not lagging:
        return 0.0
    published = [p.oldest_unapplied_at for p in lagging if p.oldest_unapplied_at is not None]
    return _age(min(published), now) if published else None


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 3)


# -- Postgres -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recorded:
    """What the daemon and the relay recorded in Postgres."""

    checkpoints: dict[str, Checkpoint]
    generations: dict[str, int]
    progress: dict[str, list[PartitionProgress]]
    dead_letters: dict[str, int]
    parked: dict[str, list[ParkedAggregate]]
    backlog: outbox.Backlog
    lanes: Recorded


async def _read_postgres(pool: asyncpg.Pool, names: Sequence[str], settings: Settings) -> _Recorded:
    checkpoints = CheckpointStore(pool)
    letters = DeadLetterStore(pool)
    with postgres_errors(postgres_address(settings.postgres), START_HINT):
        recorded = {c.projection: c for c in await checkpoints.all()}
        progress = {n: await checkpoints.progress(n, settings.kafka.topic) for n in names}
        dead_letters = {n: await letters.count(n) for n in names}
        parked = {n: [_parked(p) for p in await letters.parked(n)] for n in names}
        lanes = await read_recorded(pool, names, settings.kafka.topic)
        async with pool.acquire() as conn:
            backlog = await outbox.pending_backlog(conn)
            generations = {n: await current_generation(conn, n) for n in names}
    return _Recorded(recorded, generations, progress, dead_letters, parked, backlog, lanes)


def _parked(row: Parked) -> ParkedAggregate:
    return ParkedAggregate(
        aggregate_id=row.aggregate_id,
        projection=row.projection,
        version=row.version,
        first_letter=row.first_letter,
        parked_letters=row.letters,
        reason=row.reason,
        parked_at=row.parked_at,
    )


# -- Kafka ----------------------------------------------------------------------------


async def _read_kafka(
    kafka: KafkaSettings, progress: Mapping[str, Sequence[PartitionProgress]]
) -> dict[str, list[PartitionLag]]:
    """Per projection, its lag on each partition of the topic (none if the topic is missing)."""
    with kafka_errors(kafka_address(kafka), START_HINT):
        partitions = await topic_partitions(kafka)
        if not partitions:  # nothing was ever published
            return {name: [] for name in progress}
        async with _consumer(kafka) as consumer:
            tps = [TopicPartition(kafka.topic, p) for p in partitions]
            first = {tp.partition: o for tp, o in (await consumer.beginning_offsets(tps)).items()}
            end = {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
            lags = {name: _partition_lags(rows, first, end) for name, rows in progress.items()}
            wanted = {
                (p.partition, p.next_offset) for ps in lags.values() for p in ps if p.lag_events
            }
            published = await _published_at(consumer, kafka.topic, wanted)
    return {
        name: [
            p.model_copy(
                update={"oldest_unapplied_at": published.get((p.partition, p.next_offset))}
            )
            if p.lag_events
            else p
            for p in ps
        ]
        for name, ps in lags.items()
    }


def _partition_lags(
    rows: Sequence[PartitionProgress], first: Mapping[int, int], end: Mapping[int, int]
) -> list[PartitionLag]:
    """A partition without a progress row counts from its first offset still kept."""
    done = {row.partition: row.next_offset for row in rows}
    return [
        PartitionLag(
            partition=partition,
            next_offset=max(done.get(partition, first[partition]), first[partition]),
            end_offset=end[partition],
        )
        for partition in sorted(end)
    ]


@asynccontextmanager
async def _consumer(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer outside any group: it reads offsets and records, and commits nothing."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=_FETCH_BYTES,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    try:
        await consumer.start()
        yield consumer
    finally:
        await consumer.stop()


async def _published_at(
    consumer: AIOKafkaConsumer, topic: str, wanted: set[tuple[int, int]]
) -> dict[tuple[int, int], datetime]:
    """When the records at these (partition, offset) were published; unread ones are left out.

    A consumer has one position per partition, so projections at different offsets of one
    partition take a round each; projections of one daemon usually share their offsets.
    """
    offsets: dict[int, list[int]] = {}
    for partition, offset in sorted(wanted):
        offsets.setdefault(partition, []).append(offset)
    found: dict[tuple[int, int], datetime] = {}
    for round_ in range(max((len(o) for o in offsets.values()), default=0)):
        targets = {p: o[round_] for p, o in offsets.items() if round_ < len(o)}
        found.update(await _read_first_records(consumer, topic, targets))
    return found


async def _read_first_records(
    consumer: AIOKafkaConsumer, topic: str, targets: Mapping[int, int]
) -> dict[tuple[int, int], datetime]:
    seeks = {TopicPartition(topic, p): offset for p, offset in targets.items()}
    consumer.assign(list(seeks))
    for tp, offset in seeks.items():
        consumer.seek(tp, offset)
    found: dict[tuple[int, int], datetime] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RECORD_WAIT_S
    while len(found) < len(seeks) and (left := deadline - loop.time()) > 0:
        batches = await consumer.getmany(timeout_ms=int(left * 1000))
        for tp, records in batches.items():
            key = (tp.partition, seeks[tp])
            if records and key not in found:
                # The first record at or after the offset (an earlier one may have been
                # deleted): the oldest one not processed.
                found[key] = datetime.fromtimestamp(records[0].timestamp / 1000, tz=UTC)
                consumer.pause(tp)
    return found
