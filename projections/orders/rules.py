"""The orders domain's business rules, as pure functions (no I/O): easy to property-test.

Status machine::

    PENDING ──▶ CONFIRMED ──▶ SHIPPED ──▶ DELIVERED
       │            │
       └────────────┴──▶ CANCELLED

Nothing leaves DELIVERED or CANCELLED; the shipping address changes only
before the order ships.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from engine import RuleViolationError


class OrderStatus(enum.StrEnum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    SHIPPED = "SHIPPED"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


TRANSITIONS: Mapping[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.CONFIRMED, OrderStatus.CANCELLED}),
    OrderStatus.CONFIRMED: frozenset({OrderStatus.SHIPPED, OrderStatus.CANCELLED}),
    OrderStatus.SHIPPED: frozenset({OrderStatus.DELIVERED}),
    OrderStatus.DELIVERED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}

ADDRESS_CHANGEABLE = frozenset({OrderStatus.PENDING, OrderStatus.CONFIRMED})


class InvalidTransitionError(RuleViolationError):
    """The order cannot move from its current status to the one asked for."""

    def __init__(self, order_id: str, current: OrderStatus, target: OrderStatus) -> None:
        self.current = current
        self.target = target
        super().__init__(
            f"order {order_id} cannot go from {current.value} to {target.value}"
            + (
                f" (allowed: {', '.join(sorted(TRANSITIONS[current]))})"
                if TRANSITIONS[current]
                else ""
            ),
            details={"current": current.value, "requested": target.value},
        )


def check_transition(order_id: str, current: OrderStatus, target: OrderStatus) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidTransitionError(order_id, current, target)


def check_address_change(order_id: str, current: OrderStatus) -> None:
    if current not in ADDRESS_CHANGEABLE:
        raise RuleViolationError(
            f"order {order_id} is {current.value}: the shipping address can only change "
            "before the order ships"
        )


@dataclass(frozen=True)
class PricedLine:
    product_id: str
    product_name: str
    quantity: int
    unit_price: Decimal

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity


@dataclass(frozen=True)
class ProductInfo:
    name: str
    price: Decimal


def price_lines(
    requested: Sequence[tuple[str, int]], catalog: Mapping[str, ProductInfo]
) -> list[PricedLine]:
    """Lines priced from the catalog (never from the client); the same product merges."""
    quantities: dict[str, int] = {}
    for product_id, quantity in requested:
        quantities[product_id] = quantities.get(product_id, 0) + quantity
    return [
        PricedLine(pid, catalog[pid].name, qty, catalog[pid].price)
        for pid, qty in quantities.items()
    ]


def order_total(lines: Sequence[PricedLine]) -> Decimal:
    return sum((line.line_total for line in lines), Decimal("0.00"))
