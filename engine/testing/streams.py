"""Event streams for tests: domain events wrapped into envelopes as the command bus would.

Each event gets what the event log would give it: the next version of its
aggregate (1, 2, ...), the next global position, a fresh event id, and a
timestamp from a fixed clock (from 2026-01-01 UTC, one minute per event unless
told otherwise), so documents built from ``occurred_at`` are the same on every
run. The events of one ``add`` call share a causation id, as if one command
had recorded them.

Every event is then decoded the way the projection daemon decodes it: its
payload is the event's JSON (exactly what ``CommandBus`` stores), read back
through the application's :class:`~engine.EventRegistry` when one is given
(upcasters included), else through the event's own model. A projection under
test therefore sees JSON-shaped values (``Decimal`` from a JSON string, enums
from their value), never the very objects the test built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Self
from uuid import uuid4

from engine.errors import ConfigurationError
from engine.events import DomainEvent, EventEnvelope
from engine.projection import Projected
from engine.registry import EventRegistry

START = datetime(2026, 1, 1, tzinfo=UTC)


class EventStream:
    """An ordered history of envelopes over any number of aggregates; build it with ``add``."""

    def __init__(
        self,
        registry: EventRegistry | None = None,
        *,
        start: datetime = START,
        step: timedelta = timedelta(minutes=1),
    ) -> None:
        self._registry = registry
        self._clock = start
        self._step = step
        self._position = 0
        self._versions: dict[str, int] = {}
        self._items: list[Projected] = []

    def add(
        self,
        aggregate_id: str,
        *events: DomainEvent,
        aggregate_type: str = "aggregate",
        at: datetime | None = None,
    ) -> Self:
        """Append ``events`` as the next versions of one aggregate (``at``: the first's time)."""
        if at is not None:
            self._clock = at
        causation = uuid4()
        for event in events:
            version = self._versions.get(aggregate_id, 0) + 1
            envelope = EventEnvelope(
                event_id=uuid4(),
                event_type=event.event_type,
                schema_version=event.schema_version,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                aggregate_version=version,
                position=self._position + 1,
                occurred_at=self._clock,
                correlation_id=causation,
                causation_id=causation,
                payload=json.loads(event.model_dump_json()),
            )
            self._append(envelope, type(event))
            self._clock += self._step
        return self

    def add_envelopes(self, *envelopes: EventEnvelope) -> Self:
        """Append envelopes as they are (e.g. an old schema version, or read from the log).

        They are decoded through the registry, which is then required. Later
        ``add`` calls continue after their versions and positions.
        """
        for envelope in envelopes:
            self._append(envelope, None)
        return self

    def version_of(self, aggregate_id: str) -> int:
        """The aggregate's last version in this stream (0 if it has none)."""
        return self._versions.get(aggregate_id, 0)

    @property
    def envelopes(self) -> list[EventEnvelope]:
        return [item.envelope for item in self._items]

    @property
    def items(self) -> list[Projected]:
        """The events as a projection receives them: envelope and decoded model."""
        return list(self._items)

    def __iter__(self) -> Iterator[Projected]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def _append(self, envelope: EventEnvelope, model: type[DomainEvent] | None) -> None:
        self._items.append(Projected(envelope, self._decode(envelope, model)))
        key = envelope.aggregate_id
        self._versions[key] = max(self._versions.get(key, 0), envelope.aggregate_version)
        self._position = max(self._position, envelope.position)

    def _decode(self, envelope: EventEnvelope, model: type[DomainEvent] | None) -> DomainEvent:
        if self._registry is not None:
            return self._registry.decode(envelope)
        if model is None:
            raise ConfigurationError(
                f"cannot decode a given {envelope.event_type} envelope without a registry:"
                " pass EventStream(registry=...) (e.g. your Application's registry)"
            )
        return model.model_validate(envelope.payload)


def given(
    *events: DomainEvent,
    aggregate_id: str,
    aggregate_type: str = "aggregate",
    registry: EventRegistry | None = None,
) -> EventStream:
    """A stream of one aggregate's events, versions 1..N; ``.add`` more to it."""
    return EventStream(registry).add(aggregate_id, *events, aggregate_type=aggregate_type)
