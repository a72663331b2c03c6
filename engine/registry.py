"""Maps an event's type and schema version to its model, upcasting old versions.

An event written by schema version 1 must still decode after the model moved
to version 3: the registry keeps one upcaster per (type, from_version), each a
pure function from the old payload to the next version's payload, and applies
them in a chain before validating against the current model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from engine.errors import ConfigurationError, EventDecodeError, UnknownEventError
from engine.events import DomainEvent, EventEnvelope

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class EventRegistry:
    """The event models a domain knows, and how to bring old payloads up to date."""

    def __init__(self) -> None:
        self._models: dict[str, type[DomainEvent]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, model: type[DomainEvent]) -> type[DomainEvent]:
        """Register the current model of an event type (usable as a class decorator)."""
        existing = self._models.get(model.event_type)
        if existing is not None and existing is not model:
            raise ConfigurationError(f"event type {model.event_type!r} is registered twice")
        self._models[model.event_type] = model
        return model

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn`` turns a ``from_version`` payload into a ``from_version + 1`` one."""

        def add(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return add

    def model_for(self, event_type: str) -> type[DomainEvent]:
        try:
            return self._models[event_type]
        except KeyError:
            raise UnknownEventError(f"unknown event type {event_type!r}") from None

    @property
    def event_types(self) -> frozenset[str]:
        return frozenset(self._models)

    def upcast(self, event_type: str, version: int, payload: Payload) -> Payload:
        """Bring ``payload`` from ``version`` up to the registered model's version."""
        current = self.model_for(event_type).schema_version
        if version > current:
            raise UnknownEventError(
                f"{event_type} v{version} is newer than this code knows (v{current}): upgrade"
            )
        while version < current:
            step = self._upcasters.get((event_type, version))
            if step is None:
                raise UnknownEventError(f"no upcaster for {event_type} from v{version}")
            try:
                payload = step(dict(payload))
            except Exception as exc:  # an old payload the upcaster did not foresee: poison
                raise EventDecodeError(
                    f"upcasting {event_type} from v{version} failed: {type(exc).__name__}: {exc}"
                ) from exc
            version += 1
        return payload

    def decode(self, envelope: EventEnvelope) -> DomainEvent:
        """The envelope's payload as its current model; poison if it cannot be."""
        model = self.model_for(envelope.event_type)
        payload = envelope.payload
        if envelope.schema_version != model.schema_version:  # the common case needs no upcast
            payload = self.upcast(envelope.event_type, envelope.schema_version, payload)
        try:
            # model_validate without its Python wrapper (this runs for every event).
            event: DomainEvent = model.__pydantic_validator__.validate_python(payload)
            return event
        except ValidationError as exc:
            raise EventDecodeError(
                f"{envelope.event_type} v{envelope.schema_version} "
                f"(event {envelope.event_id}) does not fit its model: {exc}"
            ) from exc
