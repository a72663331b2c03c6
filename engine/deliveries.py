"""What a lane works on: the deliveries of one poll, and what they say about progress."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from aiokafka import TopicPartition

from engine.postgres.checkpoints import PartitionProgress
from engine.postgres.deadletters import NewDeadLetter
from engine.projection import Projected


@dataclass(frozen=True, slots=True)
class Delivery:
    """One Kafka message as the runner received it; ``item`` is None for poison.

    Slotted: one is made per message, and without a ``__dict__`` it is one
    object less for the garbage collector to walk while its batch is in flight.
    """

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

    @classmethod
    def joined(cls, batches: Sequence[Batch]) -> Batch:
        """Consecutive batches as one (a lane catching up applies them together).

        The progress is combined from each batch's own, which every lane shares,
        instead of being computed again over every delivery.
        """
        joined = cls(delivery for batch in batches for delivery in batch)
        progress: dict[tuple[str, int], PartitionProgress] = {}
        for batch in batches:
            for p in batch.progress:
                seen = progress.get((p.topic, p.partition))
                progress[(p.topic, p.partition)] = p if seen is None else later_progress(seen, p)
        joined.__dict__["progress"] = list(progress.values())
        return joined


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


def log_fields(delivery: Delivery, projection: str) -> dict[str, object]:
    """What a log line about ``delivery`` carries (engine.cli.logs.FIELDS), to find it by.

    Only for the lines about one event (a dead letter, a parked event, an
    applied event at debug level): never computed on the hot path otherwise.
    """
    fields: dict[str, object] = {
        "projection": projection,
        "partition": delivery.tp.partition,
        "offset": delivery.offset,
    }
    if delivery.item is not None:
        envelope = delivery.item.envelope
        fields.update(
            event_id=str(envelope.event_id),
            event_type=envelope.event_type,
            aggregate_id=envelope.aggregate_id,
            aggregate_version=envelope.aggregate_version,
            correlation_id=str(envelope.correlation_id),
        )
        return fields
    # Undecodable: what its headers and key still tell.
    headers = {k: v.decode(errors="replace") for k, v in delivery.headers}
    aggregate_id, version = aggregate_of(delivery)
    fields.update(
        event_id=headers.get("event_id"),
        event_type=headers.get("event_type"),
        aggregate_id=aggregate_id,
        aggregate_version=version,
        correlation_id=headers.get("correlation_id"),
    )
    return fields


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


def later_progress(a: PartitionProgress, b: PartitionProgress) -> PartitionProgress:
    """The progress of one partition that covers both ``a`` and ``b``."""
    event_at = max((t for t in (a.event_at, b.event_at) if t is not None), default=None)
    return PartitionProgress(
        a.topic,
        a.partition,
        max(a.next_offset, b.next_offset),
        max(a.position, b.position),
        event_at,
    )
