"""The orders domain's commands: structural validation only (business rules live in rules.py)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from engine import Command

# The patterns below are checked by the server and published in the OpenAPI
# document alike, so they are written for every regex dialect involved (ECMA
# for clients, Rust for pydantic, Python's re): explicit classes, no \s or \d.
#
# What strip() removes (pydantic strips strings before checking them): Unicode
# White_Space, the set Rust's trim() uses.
_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Text: something besides white space (it is stripped, then must not be empty),
# and no NUL anywhere (PostgreSQL text cannot hold one).
TEXT_PATTERN = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
EMAIL_PATTERN = rf"^[{_SPACE}]*[^@\x00{_SPACE}]+@[^@\x00{_SPACE}]+\.[^@\x00{_SPACE}]+[{_SPACE}]*$"
# A price: a positive amount with at most 2 decimals and 10 integer digits
# (numeric(12, 2)), as a string; no sign, exponent or leading zero.
PRICE_PATTERN = r"^(?:[1-9][0-9]{0,9}(?:\.[0-9]{1,2})?|0\.(?:0[1-9]|[1-9][0-9]?))$"
MAX_WHOLE_PRICE = 10**10 - 1
_PRICE = re.compile(PRICE_PATTERN)


def _text(min_length: int, max_length: int) -> Any:
    return Field(min_length=min_length, max_length=max_length, pattern=TEXT_PATTERN)


def _price(value: object) -> object:
    """A price as JSON sends it: a string in the pattern, or a whole number; never a float."""
    if isinstance(value, Decimal) or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # built in Python, or a whole number: the Field's bounds decide
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 5.0 is the integer 5 to JSON Schema, so it is to us
    if isinstance(value, str) and _PRICE.fullmatch(value):
        return value
    raise ValueError("a price is a string like '19.99' (at most 2 decimals) or a whole number")


Name = Annotated[str, _text(1, 200)]
Email = Annotated[str, Field(min_length=3, max_length=254, pattern=EMAIL_PATTERN)]
Price = Annotated[
    Decimal,
    BeforeValidator(_price),
    Field(gt=0, max_digits=12, decimal_places=2),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": PRICE_PATTERN},
                {"type": "integer", "minimum": 1, "maximum": MAX_WHOLE_PRICE},
            ],
            "description": "A positive amount, at most 2 decimals: a string such as "
            "'19.99', or a whole number (never a float, which cannot hold cents exactly).",
        }
    ),
]
Version = Annotated[int, Field(ge=1)]


class Address(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    street: Annotated[str, _text(1, 200)]
    city: Annotated[str, _text(1, 100)]
    postal_code: Annotated[str, _text(1, 20)]
    country: Annotated[str, _text(2, 56)]


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
    tracking_number: Annotated[str, _text(1, 64)]
    carrier: Annotated[str, _text(1, 64)] = "unspecified"


class DeliverOrder(OrderCommand):
    pass


class CancelOrder(OrderCommand):
    reason: Annotated[str, _text(1, 500)]


class ChangeShippingAddress(OrderCommand):
    shipping_address: Address
