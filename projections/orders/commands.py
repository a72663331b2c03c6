"""The orders domain's commands: structural validation only (business rules live in rules.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from engine import Command

Name = Annotated[str, Field(min_length=1, max_length=200)]
Email = Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
Price = Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2)]
Version = Annotated[int, Field(ge=1)]


class Address(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    street: Annotated[str, Field(min_length=1, max_length=200)]
    city: Annotated[str, Field(min_length=1, max_length=100)]
    postal_code: Annotated[str, Field(min_length=1, max_length=20)]
    country: Annotated[str, Field(min_length=2, max_length=56)]


class OrderItemRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    product_id: UUID
    quantity: Annotated[int, Field(ge=1, le=1000)]


class RegisterCustomer(Command):
    customer_id: UUID | None = None  # chosen by the domain when omitted
    name: Name
    email: Email


class RegisterProduct(Command):
    product_id: UUID | None = None
    name: Name
    price: Price


class CreateOrder(Command):
    order_id: UUID | None = None
    customer_id: UUID
    items: Annotated[list[OrderItemRequest], Field(min_length=1, max_length=100)]
    shipping_address: Address


class OrderCommand(Command):
    """A command about one existing order."""

    order_id: UUID
    # Optional optimistic-concurrency check: refuse if the order moved past this version.
    expected_version: Version | None = None


class ConfirmOrder(OrderCommand):
    pass


class ShipOrder(OrderCommand):
    tracking_number: Annotated[str, Field(min_length=1, max_length=64)]
    carrier: Annotated[str, Field(min_length=1, max_length=64)] = "unspecified"


class DeliverOrder(OrderCommand):
    pass


class CancelOrder(OrderCommand):
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class ChangeShippingAddress(OrderCommand):
    shipping_address: Address
