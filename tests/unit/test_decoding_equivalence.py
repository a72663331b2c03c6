"""The daemon's decoder agrees with plain pydantic on every message, valid or garbled.

The reference is the obvious way: ``EventEnvelope.model_validate_json``, then
the registry's upcasters, then ``model.model_validate``; an error anywhere is
poison of the same class (``UnknownEventError`` for an unknown type or a newer
version, ``EventDecodeError`` for everything else). The decoder is measured by
``python -m bench.decoding``; this pins that it stays that reference.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.data import EventStream
from engine import EventDecodeError, EventEnvelope, PoisonError, RunnerSettings, UnknownEventError
from engine.codec import encode
from engine.decoding import Decoder
from engine.events import DomainEvent
from projections.orders import APP
from tests.unit.test_events import SHIPPED_V1

TP = TopicPartition("t", 0)
REALISTIC = [encode(item.envelope) for item in EventStream(60)]


def reference(value: bytes) -> tuple[EventEnvelope, DomainEvent] | type[PoisonError]:
    registry = APP.registry
    try:
        envelope = EventEnvelope.model_validate_json(value)
    except ValidationError:
        return EventDecodeError
    if envelope.occurred_at.utcoffset() is None:
        return EventDecodeError
    try:
        model = registry.model_for(envelope.event_type)
        payload = registry.upcast(envelope.event_type, envelope.schema_version, envelope.payload)
    except PoisonError as exc:
        return type(exc)
    try:
        return envelope, model.model_validate(payload)
    except ValidationError:
        return EventDecodeError


def decoded(value: bytes, headers: list[tuple[str, bytes]]) -> Any:
    record = ConsumerRecord("t", 0, 5, 0, 0, b"k", value, None, 1, len(value), headers)
    result = Decoder(APP.registry, None, RunnerSettings()).decode(  # type: ignore[arg-type]
        {TP: [record]}, check_gaps=False
    )
    (delivery,) = result.batch
    assert delivery.offset == 5 and delivery.value == value and list(delivery.headers) == headers
    if delivery.item is None:
        (letter,) = result.poison
        return letter.error.split(":")[0]
    assert not result.poison
    return delivery.item.envelope, delivery.item.event


def assert_agrees(value: bytes, headers: list[tuple[str, bytes]]) -> None:
    expected = reference(value)
    got = decoded(value, headers)
    if isinstance(expected, type):
        assert got == expected.__name__, value
        return
    assert not isinstance(got, str), (got, value)
    envelope, event = got
    assert envelope == expected[0] and repr(envelope) == repr(expected[0])
    assert envelope.model_fields_set == expected[0].model_fields_set
    assert type(event) is type(expected[1])
    assert event == expected[1] and repr(event) == repr(expected[1])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
interesting = st.sampled_from(
    [
        "",
        "2.0",
        "10.50",
        2.0,
        10.5,
        3,
        True,
        None,
        "PENDING",
        "SHIPPED",
        " x ",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00+02:00",
        "OrderShipped",
        "OrderTeleported",
        1,
        2,
        9,
        "3",
        [],
        {},
        SHIPPED_V1,
    ]
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, bytes]]]:
    record = draw(st.sampled_from(REALISTIC))
    body = json.loads(record.value)
    for _ in range(draw(st.integers(0, 3))):
        target = body
        if body.get("payload") and isinstance(body["payload"], dict) and draw(st.booleans()):
            target = body["payload"]
        if not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            # A copy: ``interesting`` holds shared dicts (SHIPPED_V1), which later
            # mutations would otherwise edit in place, even into themselves.
            target[key] = copy.deepcopy(draw(interesting | json_values))
        elif action == "delete":
            del target[key]
        else:
            target[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(body).encode(), list(record.headers)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REALISTIC))
def test_realistic_messages_decode_as_plain_pydantic_does(record: Any) -> None:
    assert not isinstance(reference(record.value), type)
    assert_agrees(record.value, list(record.headers))


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_mutated_messages_are_accepted_or_rejected_as_plain_pydantic_does(
    message: tuple[bytes, list[tuple[str, bytes]]],
) -> None:
    assert_agrees(*message)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REALISTIC), st.data())
def test_garbled_bytes_are_poison_as_plain_pydantic_says(record: Any, data: st.DataObject) -> None:
    value = bytearray(record.value)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(value) - 1))
        value[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(value)))
    assert_agrees(bytes(value[:cut]), list(record.headers))


def test_an_old_version_is_upcast_and_a_newer_one_is_unknown() -> None:
    body = json.loads(REALISTIC[0].value)
    for version, payload in ((1, SHIPPED_V1), (3, SHIPPED_V1), (1, {"order_id": "o-1"})):
        body.update(event_type="OrderShipped", schema_version=version, payload=payload)
        assert_agrees(json.dumps(body).encode(), [])
    assert reference(json.dumps(body | {"schema_version": 3}).encode()) is UnknownEventError
