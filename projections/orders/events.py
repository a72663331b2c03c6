"""The orders domain's events. They carry what projections need to denormalize
(customer name and email, product names, totals), so no projection has to query
the write model."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine import DomainEvent, EventRegistry
from projections.orders.commands import Address
from projections.orders.rules import OrderStatus

registry = EventRegistry()


class OrderLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    product_id: str
    product_name: str
    quantity: int
    unit_price: Decimal
    line_total: Decimal


@registry.register
class CustomerRegistered(DomainEvent):
    event_type = "CustomerRegistered"
    customer_id: str
    name: str
    email: str


@registry.register
class ProductRegistered(DomainEvent):
    event_type = "ProductRegistered"
    product_id: str
    name: str
    price: Decimal


@registry.register
class OrderCreated(DomainEvent):
    event_type = "OrderCreated"
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    items: list[OrderLine]
    item_count: int
    total: Decimal
    shipping_address: Address
    status: OrderStatus = OrderStatus.PENDING


class _StatusChanged(DomainEvent):
    order_id: str
    customer_id: str
    total: Decimal
    previous_status: OrderStatus
    status: OrderStatus


@registry.register
class OrderConfirmed(_StatusChanged):
    event_type = "OrderConfirmed"


@registry.register
class OrderShipped(_StatusChanged):
    event_type = "OrderShipped"
    # v1 called the tracking number "tracking_code" and had no carrier; see the upcaster.
    schema_version = 2
    tracking_number: str
    carrier: str


@registry.register
class OrderDelivered(_StatusChanged):
    event_type = "OrderDelivered"


@registry.register
class OrderCancelled(_StatusChanged):
    event_type = "OrderCancelled"
    reason: str


@registry.register
class ShippingAddressChanged(DomainEvent):
    event_type = "ShippingAddressChanged"
    order_id: str
    shipping_address: Address


@registry.upcaster("OrderShipped", from_version=1)
def _order_shipped_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    payload["tracking_number"] = payload.pop("tracking_code")
    payload.setdefault("carrier", "unspecified")
    return payload
