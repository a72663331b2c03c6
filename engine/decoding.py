"""Decoding a poll: Kafka records into a batch of deliveries, and the poison among them.

Every failure to decode or validate a message (bad bytes, an unknown event
type or schema version, a payload the model rejects, an upcaster that raises,
a naive ``occurred_at``: any exception) is the message's, never the daemon's:
the message becomes poison, dead-lettered for every projection (``*``), and
the partition flows on. A crash instead would restart at the same offset for
ever. On the group's own stream the decoder also checks each aggregate's
versions for a jump (:mod:`engine.gaps`), which is poison too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from engine import codec, metrics
from engine.deliveries import Batch, Delivery, dead_letter, log_fields
from engine.errors import EventDecodeError, PoisonError, VersionGapError
from engine.gaps import VersionGaps
from engine.postgres.deadletters import ALL_PROJECTIONS, DeadLetterStore, NewDeadLetter
from engine.projection import Projected
from engine.registry import EventRegistry
from engine.retry import Backoff, any_error, retrying
from engine.settings import RunnerSettings

log = logging.getLogger("engine.runner")

Records = Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]


@dataclass
class Decoded:
    """A poll decoded: every message in order (poison with no item), and the poison's letters."""

    batch: Batch = field(default_factory=Batch)
    poison: list[NewDeadLetter] = field(default_factory=list)

    @property
    def parked(self) -> list[str]:
        """The aggregates the poison parks once recorded (those whose version is known)."""
        return [p.aggregate_id for p in self.poison if p.aggregate_id and p.aggregate_version]


class Decoder:
    """Decodes polls with the application's registry; records their poison."""

    def __init__(
        self, registry: EventRegistry, dead_letters: DeadLetterStore, settings: RunnerSettings
    ) -> None:
        self._registry = registry
        self._dead_letters = dead_letters
        self._settings = settings
        self.gaps = VersionGaps(settings.gap_memory_aggregates)

    def decode(self, records: Records, *, check_gaps: bool = False) -> Decoded:
        decoded = Decoded()
        check_gaps = check_gaps and self._settings.gap_memory_aggregates > 0
        append = decoded.batch.append
        for tp, messages in records.items():
            for message in messages:
                try:
                    envelope = codec.decode(message.value)
                    event = self._registry.decode(envelope)
                    if check_gaps:
                        self._check_gap(tp, envelope.aggregate_id, envelope.aggregate_version)
                except Exception as exc:
                    append(self._poison(decoded, tp, message, exc, check_gaps))
                    continue
                # The record's headers are shared, not copied: nothing changes them.
                append(
                    Delivery(
                        tp,
                        message.offset,
                        message.key,
                        message.value,
                        message.headers,
                        Projected(envelope, event),
                    )
                )
        return decoded

    def _poison(
        self,
        decoded: Decoded,
        tp: TopicPartition,
        message: ConsumerRecord[bytes, bytes],
        exc: Exception,
        check_gaps: bool,
    ) -> Delivery:
        if not isinstance(exc, PoisonError):
            exc = EventDecodeError(f"{type(exc).__name__}: {exc}")
        delivery = Delivery(tp, message.offset, message.key, message.value, message.headers, None)
        log.error(
            "dead-lettering offset %s of %s: %s",
            message.offset,
            tp,
            exc,
            extra=log_fields(delivery, ALL_PROJECTIONS),
        )
        letter = dead_letter(delivery, ALL_PROJECTIONS, exc, attempts=1)
        if check_gaps and letter.aggregate_id and letter.aggregate_version:
            # An event in sequence that does not decode is no gap after it.
            self.gaps.note_if_next(tp, letter.aggregate_id, letter.aggregate_version)
        decoded.poison.append(letter)
        return delivery

    def _check_gap(self, tp: TopicPartition, aggregate_id: str, version: int) -> None:
        expected = self.gaps.check(tp, aggregate_id, version)
        if expected is not None:
            raise VersionGapError(aggregate_id, version, expected)

    async def record(self, poison: list[NewDeadLetter]) -> None:
        """Record poison before dispatching past it, waiting out an outage.

        Dispatching past a message whose letter is not recorded would lose it
        once the offset is committed; ending the daemon instead would restart it
        at the same offset, fail again and never get past (a crash loop for the
        length of the outage). So the dispatcher waits here, with backoff.

        Recording a letter whose aggregate and version are known parks that
        aggregate for every projection (``*``); the runner tells every lane
        before it dispatches the batch, so each finds the park when it reaches
        the aggregate's later events (see :mod:`engine.postgres.deadletters`).
        """

        async def note(exc: Exception) -> None:
            log.warning("cannot record %d dead letter(s) yet: %s", len(poison), exc)

        backoff = Backoff(self._settings.backoff_initial_s, self._settings.backoff_max_s)
        await retrying(
            lambda: self._dead_letters.record(poison), backoff, retry_if=any_error, on_failure=note
        )
        metrics.EVENTS_DEAD_LETTERED.labels(ALL_PROJECTIONS).inc(len(poison))
