"""engine.testing in memory: the orders projections tested the way a user tests their own."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from engine import ConfigurationError, Document, DocumentProjection, NotFoundError, Projected
from engine.testing import (
    EventStream,
    Outcome,
    as_redis_hash,
    assert_idempotent,
    given,
    project,
)
from projections.orders import Address, ConfirmOrder, OrderStatus, registry
from projections.orders.events import (
    CustomerRegistered,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderLine,
    OrderShipped,
    ShippingAddressChanged,
)
from projections.orders.views import OrderDetails, OrderQuickLookup, OrderStats

LONDON = Address(street="1 Analytical Way", city="London", postal_code="N1", country="UK")
OSLO = Address(street="2 Fjord Gate", city="Oslo", postal_code="0150", country="NO")
LOOM = OrderLine(
    product_id="p1",
    product_name="Loom",
    quantity=2,
    unit_price=Decimal("6.25"),
    line_total=Decimal("12.50"),
)


def created(order_id: str) -> OrderCreated:
    return OrderCreated(
        order_id=order_id,
        customer_id="c1",
        customer_name="Ada",
        customer_email="ada@example.com",
        items=[LOOM],
        item_count=2,
        total=Decimal("12.50"),
        shipping_address=LONDON,
    )


def moved(order_id: str, old: OrderStatus, new: OrderStatus) -> dict[str, object]:
    return {
        "order_id": order_id,
        "customer_id": "c1",
        "total": Decimal("12.50"),
        "previous_status": old,
        "status": new,
    }


def confirmed(order_id: str) -> OrderConfirmed:
    return OrderConfirmed(**moved(order_id, OrderStatus.PENDING, OrderStatus.CONFIRMED))


def shipped(order_id: str) -> OrderShipped:
    return OrderShipped(
        **moved(order_id, OrderStatus.CONFIRMED, OrderStatus.SHIPPED),
        tracking_number="TRK-1",
        carrier="DHL",
    )


def test_order_details_folds_a_history_into_one_document() -> None:
    stream = given(created("o1"), confirmed("o1"), shipped("o1"), aggregate_id="o1")

    docs = project(OrderDetails(), stream)

    assert list(docs) == ["o1"]
    assert docs["o1"]["status"] == "SHIPPED"
    assert docs["o1"]["tracking_number"] == "TRK-1"
    assert docs["o1"]["total"] == Decimal("12.50")
    first, *_, last = stream.envelopes
    assert docs["o1"]["created_at"] == first.occurred_at
    assert docs["o1"]["shipped_at"] == docs["o1"]["updated_at"] == last.occurred_at


def test_a_stream_interleaves_aggregates_and_the_projection_skips_what_it_does_not_handle() -> None:
    stream = (
        EventStream(registry)
        .add("c1", CustomerRegistered(customer_id="c1", name="Ada", email="ada@example.com"))
        .add("o1", created("o1"))
        .add("o2", created("o2"))
        .add("o1", ShippingAddressChanged(order_id="o1", shipping_address=OSLO))
        .add(
            "o2",
            OrderCancelled(**moved("o2", OrderStatus.PENDING, OrderStatus.CANCELLED), reason="r"),
        )
    )

    docs = project(OrderQuickLookup(), stream)

    assert sorted(docs) == ["o1", "o2"]  # no document for the customer
    assert (docs["o1"]["status"], docs["o2"]["status"]) == ("PENDING", "CANCELLED")
    assert (stream.version_of("o1"), stream.version_of("o2"), stream.version_of("c9")) == (2, 2, 0)
    assert [e.position for e in stream.envelopes] == [1, 2, 3, 4, 5]


def test_the_order_projections_are_idempotent_even_through_redis_strings() -> None:
    stream = given(created("o1"), confirmed("o1"), shipped("o1"), aggregate_id="o1")

    assert assert_idempotent(OrderDetails(), stream)["o1"]["carrier"] == "DHL"
    quick = assert_idempotent(OrderQuickLookup(), stream, stored_as=as_redis_hash)
    assert quick["o1"] == {
        "status": "SHIPPED",
        "total": "12.50",
        "customer_id": "c1",
        "item_count": "2",
        "updated_at": stream.envelopes[-1].occurred_at.isoformat(),
    }


def test_redelivered_and_old_schema_envelopes_decode_and_are_gated_like_production() -> None:
    stream = given(created("o1"), confirmed("o1"), aggregate_id="o1", registry=registry)
    # OrderShipped as schema v1 wrote it: "tracking_code", no carrier (see the upcaster).
    old = given(shipped("o1"), aggregate_id="o1").envelopes[0]
    payload = {k: v for k, v in old.payload.items() if k not in ("tracking_number", "carrier")}
    v1 = old.model_copy(
        update={
            "schema_version": 1,
            "aggregate_version": 3,
            "position": 3,
            "payload": {**payload, "tracking_code": "TRK-OLD"},
        }
    )
    stream.add_envelopes(v1, *stream.envelopes)  # then the whole history again

    docs = project(OrderDetails(), stream, batch_size=2)

    assert (docs["o1"]["status"], docs["o1"]["tracking_number"]) == ("SHIPPED", "TRK-OLD")
    assert docs["o1"]["carrier"] == "unspecified"


class CountingProjection(DocumentProjection):
    """A broken projection: its output depends on how often it was called, not on the events."""

    name = "counting"
    handles = frozenset({OrderCreated.event_type})
    calls = 0

    def apply(self, doc: Document | None, item: Projected) -> Document:
        self.calls += 1
        return {"seen": self.calls}


def test_assert_idempotent_catches_a_projection_with_hidden_state() -> None:
    with pytest.raises(
        AssertionError, match="counting is not idempotent: folding the events again"
    ):
        assert_idempotent(CountingProjection(), given(created("o1"), aggregate_id="o1"))


def test_a_sql_projection_and_a_given_envelope_without_registry_are_refused_clearly() -> None:
    stream = given(created("o1"), aggregate_id="o1")
    with pytest.raises(TypeError, match="project_into"):
        project(OrderStats(), stream)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="registry"):
        EventStream().add_envelopes(*stream.envelopes)


class EventCounter(DocumentProjection):
    """Counts from the value it stored: right in memory, wrong once Redis gives back strings."""

    name = "event_counter"
    handles = frozenset({OrderCreated.event_type, OrderConfirmed.event_type})

    def apply(self, doc: Document | None, item: Projected) -> Document:
        return {"events": (doc or {}).get("events", 0) + 1}


def test_folding_through_redis_strings_reveals_arithmetic_on_stored_values() -> None:
    stream = given(created("o1"), confirmed("o1"), aggregate_id="o1")
    assert project(EventCounter(), stream) == {"o1": {"events": 2}}
    with pytest.raises(TypeError, match="str"):
        project(EventCounter(), stream, batch_size=1, stored_as=as_redis_hash)


def test_outcome_assertions_fail_with_what_happened_instead() -> None:
    succeeded = Outcome(ConfirmOrder(order_id=uuid.uuid4()), events=[confirmed("o1")])
    assert succeeded.expect_events(OrderConfirmed) == [confirmed("o1")]
    with pytest.raises(AssertionError, match="recorded"):
        succeeded.expect_events(confirmed("o2"))
    with pytest.raises(AssertionError, match="expected NotFoundError, got success"):
        succeeded.expect_error(NotFoundError)

    refused = Outcome(ConfirmOrder(order_id=uuid.uuid4()), error=NotFoundError("order", "o9"))
    assert refused.expect_error(NotFoundError, match="o9").aggregate_id == "o9"
    with pytest.raises(AssertionError, match="raised NotFoundError"):
        refused.expect_events()
