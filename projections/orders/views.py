"""The orders read models, built on the engine's public projection API only.

Five projections, one per read need:

- ``order_details`` (Postgres): everything about one order, denormalized;
- ``customer_orders`` (Postgres): a customer's orders, for newest-first paging;
- ``order_stats`` (Postgres): counts and revenue per status and per day;
- ``order_quick_lookup`` (Redis): a small hash per order for key lookups;
- ``order_search`` (Elasticsearch): a document per order for free-text search.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import Any, ClassVar

from engine import Document, DocumentProjection, Projected, SqlProjection
from projections.orders.events import (
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderDelivered,
    OrderShipped,
    ShippingAddressChanged,
)
from projections.orders.rules import OrderStatus

_STATUS_EVENTS = (OrderConfirmed, OrderShipped, OrderDelivered, OrderCancelled)
_STATUS_TYPES = frozenset(cls.event_type for cls in _STATUS_EVENTS)
_TIMESTAMP_OF = {
    OrderStatus.CONFIRMED: "confirmed_at",
    OrderStatus.SHIPPED: "shipped_at",
    OrderStatus.DELIVERED: "delivered_at",
    OrderStatus.CANCELLED: "cancelled_at",
}


def _status_change(item: Projected) -> Document:
    """The fields every status event sets, whatever the projection."""
    event = item.event
    assert isinstance(event, _STATUS_EVENTS)
    return {
        "status": event.status.value,
        "total": event.total,
        "updated_at": item.envelope.occurred_at,
    }


def _touch_or_change(doc: Document | None, item: Projected) -> Document:
    """A status event changes status and total; any other change only moves ``updated_at``."""
    if isinstance(item.event, _STATUS_EVENTS):
        return {**(doc or {}), **_status_change(item)}
    return {**(doc or {}), "updated_at": item.envelope.occurred_at}


class OrderDetails(DocumentProjection):
    name = "order_details"
    handles = frozenset(
        {OrderCreated.event_type, ShippingAddressChanged.event_type, *_STATUS_TYPES}
    )

    SCHEMA: ClassVar[str] = """
        CREATE TABLE IF NOT EXISTS {table} (
            id              text PRIMARY KEY,
            customer_id     text,
            customer_name   text,
            customer_email  text,
            status          text,
            total           numeric(14, 2),
            item_count      integer,
            items           jsonb,
            street          text,
            city            text,
            postal_code     text,
            country         text,
            tracking_number text,
            carrier         text,
            cancel_reason   text,
            created_at      timestamptz,
            confirmed_at    timestamptz,
            shipped_at      timestamptz,
            delivered_at    timestamptz,
            cancelled_at    timestamptz,
            updated_at      timestamptz,
            version         integer NOT NULL
        )
    """

    def apply(self, doc: Document | None, item: Projected) -> Document:
        event = item.event
        at = item.envelope.occurred_at
        if isinstance(event, OrderCreated):
            return {
                "customer_id": event.customer_id,
                "customer_name": event.customer_name,
                "customer_email": event.customer_email,
                "status": event.status.value,
                "total": event.total,
                "item_count": event.item_count,
                "items": [line.model_dump(mode="json") for line in event.items],
                **event.shipping_address.model_dump(),
                "created_at": at,
                "updated_at": at,
            }
        base = dict(doc or {})
        if isinstance(event, ShippingAddressChanged):
            return {**base, **event.shipping_address.model_dump(), "updated_at": at}
        assert isinstance(event, _STATUS_EVENTS)
        changes = {**_status_change(item), _TIMESTAMP_OF[event.status]: at}
        if isinstance(event, OrderShipped):
            changes |= {"tracking_number": event.tracking_number, "carrier": event.carrier}
        if isinstance(event, OrderCancelled):
            changes["cancel_reason"] = event.reason
        return {**base, **changes}


class CustomerOrders(DocumentProjection):
    name = "customer_orders"
    handles = frozenset(
        {OrderCreated.event_type, ShippingAddressChanged.event_type, *_STATUS_TYPES}
    )

    SCHEMA: ClassVar[str] = """
        CREATE TABLE IF NOT EXISTS {table} (
            id          text PRIMARY KEY,
            customer_id text,
            status      text,
            total       numeric(14, 2),
            item_count  integer,
            created_at  timestamptz,
            updated_at  timestamptz,
            version     integer NOT NULL
        );
        CREATE INDEX IF NOT EXISTS {table}_by_customer
            ON {table} (customer_id, created_at DESC, id DESC);
        CREATE INDEX IF NOT EXISTS {table}_by_status ON {table} (status, created_at DESC, id DESC)
    """

    def apply(self, doc: Document | None, item: Projected) -> Document:
        event = item.event
        if isinstance(event, OrderCreated):
            at = item.envelope.occurred_at
            return {
                "customer_id": event.customer_id,
                "status": event.status.value,
                "total": event.total,
                "item_count": event.item_count,
                "created_at": at,
                "updated_at": at,
            }
        return _touch_or_change(doc, item)


class OrderQuickLookup(DocumentProjection):
    name = "order_quick_lookup"
    handles = frozenset(
        {OrderCreated.event_type, ShippingAddressChanged.event_type, *_STATUS_TYPES}
    )

    def apply(self, doc: Document | None, item: Projected) -> Document:
        event = item.event
        if isinstance(event, OrderCreated):
            return {
                "status": event.status.value,
                "total": event.total,
                "customer_id": event.customer_id,
                "item_count": event.item_count,
                "updated_at": item.envelope.occurred_at,
            }
        return _touch_or_change(doc, item)


class OrderSearch(DocumentProjection):
    name = "order_search"
    handles = frozenset(
        {OrderCreated.event_type, ShippingAddressChanged.event_type, *_STATUS_TYPES}
    )

    # Core field types and the standard analyzer only: the integ-test distribution
    # of Elasticsearch has no analysis-common or mapper-extras module.
    MAPPINGS: ClassVar[dict[str, Any]] = {
        "dynamic": "strict",
        "properties": {
            "order_id": {"type": "keyword"},
            "customer_id": {"type": "keyword"},
            "customer_name": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
            "product_names": {"type": "text"},
            "shipping_city": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
            "status": {"type": "keyword"},
            "total": {"type": "double"},
            "item_count": {"type": "integer"},
            "created_at": {"type": "date"},
            "updated_at": {"type": "date"},
        },
    }

    def apply(self, doc: Document | None, item: Projected) -> Document:
        event = item.event
        at = item.envelope.occurred_at.isoformat()
        if isinstance(event, OrderCreated):
            return {
                "order_id": event.order_id,
                "customer_id": event.customer_id,
                "customer_name": event.customer_name,
                "product_names": [line.product_name for line in event.items],
                "shipping_city": event.shipping_address.city,
                "status": event.status.value,
                "total": float(event.total),
                "item_count": event.item_count,
                "created_at": at,
                "updated_at": at,
            }
        base = dict(doc or {})
        if isinstance(event, ShippingAddressChanged):
            return {**base, "shipping_city": event.shipping_address.city, "updated_at": at}
        assert isinstance(event, _STATUS_EVENTS)
        return {**base, "status": event.status.value, "total": float(event.total), "updated_at": at}


class OrderStats(SqlProjection):
    """Counts and revenue per (day the order was placed, current status)."""

    name = "order_stats"
    handles = frozenset({OrderCreated.event_type, *_STATUS_TYPES})
    tables = ("order_stats_daily", "order_stats_orders")
    schema = """
        CREATE TABLE IF NOT EXISTS {order_stats_daily} (
            day     date NOT NULL,
            status  text NOT NULL,
            orders  bigint NOT NULL,
            revenue numeric(18, 2) NOT NULL,
            PRIMARY KEY (day, status)
        );
        CREATE TABLE IF NOT EXISTS {order_stats_orders} (
            order_id text PRIMARY KEY,
            day      date NOT NULL,
            status   text NOT NULL,
            total    numeric(14, 2) NOT NULL
        )
    """

    async def apply_batch(
        self, conn: Any, items: Sequence[Projected], tables: Mapping[str, str]
    ) -> None:
        daily, orders = tables["order_stats_daily"], tables["order_stats_orders"]
        ids = sorted({item.aggregate_id for item in items})
        rows = await conn.fetch(
            f"SELECT order_id, day, status, total FROM {orders} WHERE order_id = ANY($1)", ids
        )
        memo: dict[str, tuple[date, str, Decimal]] = {
            r["order_id"]: (r["day"], r["status"], r["total"]) for r in rows
        }
        deltas: dict[tuple[date, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
        touched: set[str] = set()
        for item in items:
            event = item.event
            if isinstance(event, OrderCreated):
                day = item.envelope.occurred_at.date()
                memo[event.order_id] = (day, event.status.value, event.total)
                _add(deltas, day, event.status.value, 1, event.total)
            elif isinstance(event, _STATUS_EVENTS) and item.aggregate_id in memo:
                day, old, total = memo[item.aggregate_id]
                _add(deltas, day, old, -1, -total)
                _add(deltas, day, event.status.value, 1, total)
                memo[item.aggregate_id] = (day, event.status.value, total)
            touched.add(item.aggregate_id)
        await conn.execute(
            f"INSERT INTO {daily} AS s (day, status, orders, revenue)"
            " SELECT * FROM unnest($1::date[], $2::text[], $3::bigint[], $4::numeric[])"
            " ON CONFLICT (day, status) DO UPDATE SET"
            " orders = s.orders + EXCLUDED.orders, revenue = s.revenue + EXCLUDED.revenue",
            [k[0] for k in deltas],
            [k[1] for k in deltas],
            [v[0] for v in deltas.values()],
            [v[1] for v in deltas.values()],
        )
        changed = [o for o in sorted(touched) if o in memo]
        await conn.execute(
            f"INSERT INTO {orders} (order_id, day, status, total)"
            " SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::numeric[])"
            " ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status",
            changed,
            [memo[o][0] for o in changed],
            [memo[o][1] for o in changed],
            [memo[o][2] for o in changed],
        )


def _add(
    deltas: dict[tuple[date, str], list[Any]], day: date, status: str, n: int, money: Decimal
) -> None:
    entry = deltas[(day, status)]
    entry[0] += n
    entry[1] += money
