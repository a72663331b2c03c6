"""The orders query handlers: typed answers from the read model, never raw rows.

Every handler reads one projection's store (through the read-only role for
Postgres) and may take a consistency token: it then first waits, bounded, until
that projection has processed the write (read-your-writes), and raises
``NotYetConsistentError`` rather than answer with older data.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import (
    ConsistencyGate,
    ConsistencyToken,
    NotFoundError,
    RedisHashReader,
    ValidationFailedError,
)
from projections.orders.rules import OrderStatus
from projections.orders.views import CustomerOrders, OrderDetails, OrderQuickLookup, OrderStats

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
MAX_STATS_DAYS = 3660


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class OrderLineView(_View):
    product_id: str
    product_name: str
    quantity: int
    unit_price: Decimal
    line_total: Decimal


class OrderDetailsView(_View):
    """Everything about one order (the ``order_details`` projection)."""

    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    status: OrderStatus
    total: Decimal
    item_count: int
    items: list[OrderLineView]
    street: str
    city: str
    postal_code: str
    country: str
    tracking_number: str | None
    carrier: str | None
    cancel_reason: str | None
    created_at: datetime
    confirmed_at: datetime | None
    shipped_at: datetime | None
    delivered_at: datetime | None
    cancelled_at: datetime | None
    updated_at: datetime
    version: int


class OrderSummary(_View):
    """One line of an order list (the ``customer_orders`` projection)."""

    order_id: str
    customer_id: str
    status: OrderStatus
    total: Decimal
    item_count: int
    created_at: datetime
    updated_at: datetime
    version: int


class OrderSummaryPage(_View):
    items: list[OrderSummary]
    # Pass it back as ``cursor`` for the next page; None on the last page.
    next_cursor: str | None


class DailyStats(_View):
    day: date
    status: OrderStatus
    orders: int
    revenue: Decimal


class StatusTotals(_View):
    status: OrderStatus
    orders: int
    revenue: Decimal


class OrderStatsReport(_View):
    """Orders and revenue per day placed and current status (the ``order_stats`` projection)."""

    date_from: date
    date_to: date
    days: list[DailyStats]
    totals: list[StatusTotals]


class QuickLookup(_View):
    """A few fields of one order, by key; ``source`` says which store answered."""

    order_id: str
    source: Literal["redis", "postgres"]
    status: OrderStatus
    total: Decimal
    customer_id: str
    item_count: int
    updated_at: datetime
    version: int


class _Cursor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    created_at: datetime
    order_id: str = Field(max_length=200)


def encode_cursor(summary: OrderSummary) -> str:
    raw = _Cursor(created_at=summary.created_at, order_id=summary.order_id).model_dump_json()
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> _Cursor:
    """A cursor this module issued; anything else is the client's mistake."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return _Cursor.model_validate(json.loads(raw))
    except (binascii.Error, ValueError, ValidationError, UnicodeDecodeError) as exc:
        raise ValidationFailedError("cursor", "not a cursor returned by this API") from exc


def check_page_size(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValidationFailedError("limit", f"must be between 1 and {MAX_PAGE_SIZE}")
    return limit


@dataclass(frozen=True)
class OrdersQueries:
    """The orders read side: Postgres views (read-only role), Redis hashes, and the gate."""

    pool: asyncpg.Pool
    quick: RedisHashReader
    gate: ConsistencyGate

    async def order_details(
        self, order_id: str, token: ConsistencyToken | None = None
    ) -> OrderDetailsView:
        await self.gate.wait([OrderDetails.name], token)
        row = await self.pool.fetchrow("SELECT * FROM order_details WHERE id = $1", order_id)
        if row is None:
            raise NotFoundError("order", order_id)
        fields = dict(row)
        fields["order_id"] = fields.pop("id")
        fields["items"] = json.loads(fields["items"]) if fields["items"] else []
        return OrderDetailsView.model_validate(fields)

    async def customer_orders(
        self,
        customer_id: str,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        token: ConsistencyToken | None = None,
    ) -> OrderSummaryPage:
        """A customer's orders, newest first (keyset paging: stable under concurrent writes)."""
        await self.gate.wait([CustomerOrders.name], token)
        return await self._summaries("customer_id", customer_id, cursor, limit)

    async def orders_by_status(
        self,
        status: OrderStatus,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        token: ConsistencyToken | None = None,
    ) -> OrderSummaryPage:
        """Orders currently in ``status``, newest first."""
        await self.gate.wait([CustomerOrders.name], token)
        return await self._summaries("status", status.value, cursor, limit)

    async def _summaries(
        self, column: Literal["customer_id", "status"], value: str, cursor: str | None, limit: int
    ) -> OrderSummaryPage:
        check_page_size(limit)
        after = decode_cursor(cursor) if cursor else None
        rows = await self.pool.fetch(
            "SELECT id AS order_id, customer_id, status, total, item_count, created_at,"
            f" updated_at, version FROM customer_orders WHERE {column} = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
            " ORDER BY created_at DESC, id DESC LIMIT $4",
            value,
            after.created_at if after else None,
            after.order_id if after else "",
            limit + 1,
        )
        items = [OrderSummary.model_validate(dict(row)) for row in rows[:limit]]
        more = len(rows) > limit
        return OrderSummaryPage(items=items, next_cursor=encode_cursor(items[-1]) if more else None)

    async def order_stats(
        self, date_from: date, date_to: date, token: ConsistencyToken | None = None
    ) -> OrderStatsReport:
        """Per day placed (inclusive range) and status: orders and revenue, plus totals."""
        if date_to < date_from:
            raise ValidationFailedError("date_to", "must not be before date_from")
        if (date_to - date_from).days > MAX_STATS_DAYS:
            raise ValidationFailedError("date_to", f"a range spans at most {MAX_STATS_DAYS} days")
        await self.gate.wait([OrderStats.name], token)
        rows = await self.pool.fetch(
            "SELECT day, status, orders, revenue FROM order_stats_daily"
            " WHERE day BETWEEN $1 AND $2 AND orders > 0 ORDER BY day, status",
            date_from,
            date_to,
        )
        days = [DailyStats.model_validate(dict(row)) for row in rows]
        return OrderStatsReport(
            date_from=date_from, date_to=date_to, days=days, totals=_totals(days)
        )

    async def quick_lookup(
        self, order_id: str, token: ConsistencyToken | None = None
    ) -> QuickLookup:
        """The order's hash from Redis; the Postgres list view when the key is missing."""
        await self.gate.wait([OrderQuickLookup.name], token)
        found = await self.quick.get(order_id)
        if found is not None:
            fields, version = found
            return QuickLookup.model_validate(
                {**fields, "order_id": order_id, "version": version, "source": "redis"}
            )
        # Redis lost the key (evicted, flushed, being rebuilt): answer from Postgres,
        # which must then be consistent with the token as well.
        await self.gate.wait([CustomerOrders.name], token)
        row = await self.pool.fetchrow(
            "SELECT status, total, customer_id, item_count, updated_at, version"
            " FROM customer_orders WHERE id = $1",
            order_id,
        )
        if row is None:
            raise NotFoundError("order", order_id)
        return QuickLookup.model_validate({**dict(row), "order_id": order_id, "source": "postgres"})


def _totals(days: Sequence[DailyStats]) -> list[StatusTotals]:
    by_status: dict[OrderStatus, tuple[int, Decimal]] = {}
    for day in days:
        orders, revenue = by_status.get(day.status, (0, Decimal(0)))
        by_status[day.status] = (orders + day.orders, revenue + day.revenue)
    return [
        StatusTotals(status=status, orders=orders, revenue=revenue)
        for status, (orders, revenue) in sorted(by_status.items(), key=lambda kv: kv[0].value)
    ]
