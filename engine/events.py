"""Events: immutable, typed, versioned facts, and the envelope that carries them.

A domain event is a frozen pydantic model that names its ``event_type`` and
``schema_version``. The envelope adds what the engine needs to order, route and
de-duplicate it: a unique id, the aggregate and its version (the per-aggregate
order), the global position assigned by the event log, the time, and the
correlation and causation ids (the command that caused it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class DomainEvent(BaseModel):
    """Base of every domain event. Subclasses set ``event_type`` and ``schema_version``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1


class EventEnvelope(BaseModel):
    """An event as stored in the event log and published to Kafka."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    event_type: str
    schema_version: int
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    position: int
    occurred_at: datetime
    correlation_id: UUID
    causation_id: UUID
    payload: dict[str, Any]
