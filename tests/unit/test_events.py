"""Event registry, upcasters and the Kafka codec."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from engine import EventDecodeError, EventEnvelope, UnknownEventError
from engine.codec import decode, encode
from projections.orders import registry
from projections.orders.events import OrderCreated, OrderShipped


def _envelope(event_type: str, version: int, payload: dict[str, Any]) -> EventEnvelope:
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type=event_type,
        schema_version=version,
        aggregate_type="order",
        aggregate_id="o-1",
        aggregate_version=3,
        position=42,
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        correlation_id=uuid.uuid4(),
        causation_id=uuid.uuid4(),
        payload=payload,
    )


SHIPPED_V1 = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "total": "10.00",
    "previous_status": "CONFIRMED",
    "status": "SHIPPED",
    "tracking_code": "TRK-9",
}


def test_an_old_schema_version_is_upcast_to_the_current_model() -> None:
    event = registry.decode(_envelope("OrderShipped", 1, SHIPPED_V1))
    assert isinstance(event, OrderShipped)
    assert OrderShipped.schema_version == 2
    assert event.tracking_number == "TRK-9"
    assert event.carrier == "unspecified"
    assert event.total == Decimal("10.00")


def test_the_current_version_decodes_without_upcasting() -> None:
    payload = {**SHIPPED_V1, "tracking_number": "T", "carrier": "DHL"}
    del payload["tracking_code"]
    event = registry.decode(_envelope("OrderShipped", 2, payload))
    assert isinstance(event, OrderShipped) and event.carrier == "DHL"


def test_unknown_types_and_future_versions_are_poison() -> None:
    with pytest.raises(UnknownEventError, match="unknown event type"):
        registry.decode(_envelope("OrderTeleported", 1, {}))
    with pytest.raises(UnknownEventError, match="newer than this code knows"):
        registry.decode(_envelope("OrderShipped", 9, SHIPPED_V1))


def test_a_payload_that_does_not_fit_its_model_is_poison() -> None:
    with pytest.raises(EventDecodeError, match="OrderCreated v1"):
        registry.decode(_envelope("OrderCreated", 1, {"order_id": "o-1"}))


def test_events_are_immutable() -> None:
    event = registry.decode(_envelope("OrderShipped", 1, SHIPPED_V1))
    with pytest.raises(ValueError, match="frozen"):
        event.carrier = "x"  # type: ignore[misc]
    assert OrderCreated.event_type in registry.event_types


def test_codec_round_trips_and_carries_ids_in_headers() -> None:
    envelope = _envelope("OrderShipped", 1, SHIPPED_V1)
    record = encode(envelope)
    assert record.key == b"o-1"
    headers = dict(record.headers)
    assert headers["event_id"] == str(envelope.event_id).encode()
    assert headers["event_type"] == b"OrderShipped"
    assert headers["aggregate_version"] == b"3"
    assert headers["causation_id"] == str(envelope.causation_id).encode()
    assert decode(record.value) == envelope


@pytest.mark.parametrize("value", [None, b"", b"not json", b'{"event_type": "x"}', b"\xff\xfe"])
def test_malformed_messages_are_poison_not_crashes(value: bytes | None) -> None:
    with pytest.raises(EventDecodeError):
        decode(value)
