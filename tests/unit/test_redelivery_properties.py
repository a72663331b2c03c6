"""Property: any interleaving of duplicates and redeliveries yields the same final state.

Kafka keeps each aggregate's events in order within a partition, but a consumer
may see a prefix again (a crash before the commit, a rebalance), and batches
cut the stream anywhere. Whatever the batches, the folded documents must equal
those of applying every event exactly once.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import EventEnvelope, Projected
from engine.projection import Document, DocumentProjection, fold
from projections.orders.commands import Address
from projections.orders.events import (
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderDelivered,
    OrderLine,
    OrderShipped,
    ShippingAddressChanged,
)
from projections.orders.rules import OrderStatus
from projections.orders.views import CustomerOrders, OrderDetails, OrderQuickLookup, OrderSearch

T0 = datetime(2026, 3, 1, tzinfo=UTC)
ADDRESS = Address(street="1 Way", city="Oslo", postal_code="0150", country="NO")


def _history(order: str, steps: int, cancel: bool) -> list[Projected]:
    common = {"order_id": order, "customer_id": "c1", "total": Decimal("12.50")}
    created = OrderCreated(
        **common,
        customer_name="Ada",
        customer_email="ada@example.com",
        items=[
            OrderLine(
                product_id="p1",
                product_name="Loom",
                quantity=2,
                unit_price=Decimal("6.25"),
                line_total=Decimal("12.50"),
            )
        ],
        item_count=2,
        shipping_address=ADDRESS,
    )
    chain = [
        created,
        ShippingAddressChanged(order_id=order, shipping_address=ADDRESS),
        OrderConfirmed(**common, previous_status=OrderStatus.PENDING, status=OrderStatus.CONFIRMED),
        OrderShipped(
            **common,
            previous_status=OrderStatus.CONFIRMED,
            status=OrderStatus.SHIPPED,
            tracking_number="T1",
            carrier="DHL",
        ),
        OrderDelivered(**common, previous_status=OrderStatus.SHIPPED, status=OrderStatus.DELIVERED),
    ][: steps + 1]
    if cancel and len(chain) <= 3:
        previous = OrderStatus.CONFIRMED if len(chain) == 3 else OrderStatus.PENDING
        chain.append(
            OrderCancelled(
                **common, previous_status=previous, status=OrderStatus.CANCELLED, reason="r"
            )
        )
    return [
        Projected(
            EventEnvelope(
                event_id=uuid.uuid4(),
                event_type=event.event_type,
                schema_version=event.schema_version,
                aggregate_type="order",
                aggregate_id=order,
                aggregate_version=n,
                position=n,
                occurred_at=T0 + timedelta(minutes=n),
                correlation_id=uuid.uuid4(),
                causation_id=uuid.uuid4(),
                payload=event.model_dump(mode="json"),
            ),
            event,
        )
        for n, event in enumerate(chain, start=1)
    ]


def _apply_all(
    projection: DocumentProjection, batches: list[list[Projected]]
) -> dict[str, tuple[Document, int]]:
    store: dict[str, tuple[Document | None, int]] = {}
    for batch in batches:
        wanted = [item for item in batch if projection.wants(item.envelope)]
        store.update(fold(projection, store, wanted))
    return {k: (doc, v) for k, (doc, v) in store.items() if doc is not None}


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Projected], list[list[Projected]]]:
    """A clean stream, and the same stream with replayed prefixes, cut into batches."""
    orders = draw(st.integers(1, 3))
    streams = [
        _history(f"o{n}", draw(st.integers(0, 4)), draw(st.booleans())) for n in range(orders)
    ]
    clean: list[Projected] = []
    cursors = [0] * orders
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        n = draw(st.sampled_from([i for i, s in enumerate(streams) if cursors[i] < len(s)]))
        clean.append(streams[n][cursors[n]])
        cursors[n] += 1
    delivered: list[Projected] = []
    position, rewinds = 0, 0
    while position < len(clean):
        step = draw(st.integers(1, len(clean) - position))
        delivered += clean[position : position + step]
        position += step
        if rewinds < 3 and draw(st.booleans()):
            # A crash before the commit: consumption restarts from an earlier offset.
            position = draw(st.integers(0, position - 1))
            rewinds += 1
    cuts = sorted(draw(st.lists(st.integers(0, len(delivered)), max_size=6)))
    bounds = [0, *cuts, len(delivered)]
    batches = [delivered[a:b] for a, b in itertools.pairwise(bounds)]
    return clean, batches


@settings(max_examples=200, deadline=None)
@given(deliveries())
def test_duplicates_and_redeliveries_fold_to_the_clean_result(
    case: tuple[list[Projected], list[list[Projected]]],
) -> None:
    clean, batches = case
    for projection in (OrderDetails(), CustomerOrders(), OrderQuickLookup(), OrderSearch()):
        assert _apply_all(projection, batches) == _apply_all(projection, [clean]), projection.name
