"""Command handlers: load from the write model, apply the rules, save, record events.

Optimistic concurrency: a handler reads the order's version without locking,
then updates ``WHERE version = <read version>``. A concurrent writer that got
there first makes that update match no row (Postgres re-checks the condition
after waiting for the other transaction), and the command fails with a
ConflictError instead of overwriting the other change.

Round trips: the read and the conditioned update are one statement (a CTE
reads, the update joins it), and the rules are checked on what it read right
after; a refusal raises, which rolls the whole transaction (and so the
update) back. A new order reads its customer and products in one statement
and writes itself and its lines in another.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg

from engine import (
    ConflictError,
    Connection,
    DomainEvent,
    Handler,
    NotFoundError,
    RuleViolationError,
    UnitOfWork,
)
from projections.orders.commands import (
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    OrderCommand,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)
from projections.orders.events import (
    CustomerRegistered,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderDelivered,
    OrderLine,
    OrderShipped,
    ProductRegistered,
    ShippingAddressChanged,
)
from projections.orders.rules import (
    OrderStatus,
    ProductInfo,
    check_address_change,
    check_transition,
    order_total,
    price_lines,
)

# Ids the domain chooses are derived from the command id, so a retried command
# (same id) would choose the same one.
_ID_NAMESPACE = uuid.UUID("5b0c3f53-63a3-4f57-9d4b-0c5b6c1f1e2a")


def _new_id(work: UnitOfWork, given: uuid.UUID | None) -> uuid.UUID:
    return given or uuid.uuid5(_ID_NAMESPACE, str(work.command.command_id))


async def register_customer(work: UnitOfWork, cmd: RegisterCustomer) -> tuple[str, int]:
    customer_id = _new_id(work, cmd.customer_id)
    taken = await work.conn.fetchval(
        "SELECT id FROM customers WHERE id = $1 OR lower(email) = lower($2)", customer_id, cmd.email
    )
    if taken is not None:
        raise RuleViolationError(f"a customer with id {customer_id} or email {cmd.email} exists")
    await work.conn.execute(
        "INSERT INTO customers (id, name, email, version, created_at) VALUES ($1, $2, $3, 1, $4)",
        customer_id,
        cmd.name,
        cmd.email,
        work.occurred_at,
    )
    event = CustomerRegistered(customer_id=str(customer_id), name=cmd.name, email=cmd.email)
    work.record("customer", str(customer_id), 1, event)
    return str(customer_id), 1


async def register_product(work: UnitOfWork, cmd: RegisterProduct) -> tuple[str, int]:
    product_id = _new_id(work, cmd.product_id)
    inserted = await work.conn.fetchval(
        "INSERT INTO products (id, name, price, version, created_at) VALUES ($1, $2, $3, 1, $4)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        product_id,
        cmd.name,
        cmd.price,
        work.occurred_at,
    )
    if inserted is None:
        raise RuleViolationError(f"product {product_id} already exists")
    event = ProductRegistered(product_id=str(product_id), name=cmd.name, price=cmd.price)
    work.record("product", str(product_id), 1, event)
    return str(product_id), 1


# The customer and the products an order names, in one round trip: no row means no
# such customer; a row per product found (product columns null when none is).
_ORDER_INPUTS = (
    "SELECT c.name AS customer_name, c.email, p.id, p.name, p.price FROM customers c"
    " LEFT JOIN products p ON p.id = ANY($2::uuid[]) WHERE c.id = $1"
)
# The order and its lines in one statement; nothing is inserted when the order exists.
_INSERT_ORDER = (
    "WITH new AS (INSERT INTO orders (id, customer_id, status, street, city, postal_code,"
    " country, total, version, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9) ON CONFLICT (id) DO NOTHING RETURNING id),"
    " lines AS (INSERT INTO order_items (order_id, line_no, product_id, product_name, quantity,"
    " unit_price) SELECT new.id, l.* FROM new, unnest($10::int[], $11::uuid[], $12::text[],"
    " $13::int[], $14::numeric[]) AS l)"
    " SELECT count(*) FROM new"
)


async def create_order(work: UnitOfWork, cmd: CreateOrder) -> tuple[str, int]:
    conn = work.conn
    wanted = sorted({item.product_id for item in cmd.items})
    rows = await conn.fetch(_ORDER_INPUTS, cmd.customer_id, wanted)
    if not rows:
        raise NotFoundError("customer", str(cmd.customer_id))
    customer = rows[0]
    catalog = {str(r["id"]): ProductInfo(r["name"], r["price"]) for r in rows if r["id"]}
    for product_id in wanted:
        if str(product_id) not in catalog:
            raise NotFoundError("product", str(product_id))
    lines = price_lines([(str(i.product_id), i.quantity) for i in cmd.items], catalog)
    total = order_total(lines)
    order_id = _new_id(work, cmd.order_id)
    address = cmd.shipping_address
    inserted = await conn.fetchval(
        _INSERT_ORDER,
        order_id,
        cmd.customer_id,
        OrderStatus.PENDING.value,
        address.street,
        address.city,
        address.postal_code,
        address.country,
        total,
        work.occurred_at,
        list(range(1, len(lines) + 1)),
        [uuid.UUID(line.product_id) for line in lines],
        [line.product_name for line in lines],
        [line.quantity for line in lines],
        [line.unit_price for line in lines],
    )
    if not inserted:
        raise RuleViolationError(f"order {order_id} already exists")
    event = OrderCreated(
        order_id=str(order_id),
        customer_id=str(cmd.customer_id),
        customer_name=customer["customer_name"],
        customer_email=customer["email"],
        items=[
            OrderLine(
                product_id=line.product_id,
                product_name=line.product_name,
                quantity=line.quantity,
                unit_price=line.unit_price,
                line_total=line.line_total,
            )
            for line in lines
        ],
        item_count=sum(line.quantity for line in lines),
        total=total,
        shipping_address=address,
    )
    work.record("order", str(order_id), 1, event)
    return str(order_id), 1


async def _change_order(
    conn: Connection, order_id: uuid.UUID, expected: int | None, changes: dict[str, Any]
) -> tuple[asyncpg.Record, int]:
    """Read the order and write ``changes`` in one statement; the row read, the new version.

    The read (``old``) and the update share the statement's snapshot, and the
    update is conditioned on the version read, so this is the optimistic check
    of the module docstring in one round trip. The caller checks the rules on
    the row read *after* the write: a refusal raises, and the transaction,
    with the write, is rolled back.
    """
    columns = list(changes)
    assignments = ", ".join(f"{col} = ${n}" for n, col in enumerate(columns, start=2))
    row = await conn.fetchrow(
        "WITH old AS (SELECT status, version, customer_id, total FROM orders WHERE id = $1),"
        f" saved AS (UPDATE orders o SET {assignments}, version = o.version + 1 FROM old"
        " WHERE o.id = $1 AND o.version = old.version RETURNING o.version)"
        " SELECT old.*, (SELECT count(*) FROM saved) AS saved FROM old",
        order_id,
        *changes.values(),
    )
    if row is None:
        raise NotFoundError("order", str(order_id))
    if expected is not None and expected != row["version"]:
        raise ConflictError(
            f"order {order_id} is at version {row['version']}, not {expected}", str(order_id)
        )
    return row, row["version"] + 1


def _saved(row: asyncpg.Record, order_id: uuid.UUID) -> None:
    """Refuse if a concurrent command changed the order after it was read."""
    if row["saved"] != 1:
        raise ConflictError(
            f"order {order_id} was changed by a concurrent command; reload and retry", str(order_id)
        )


_STATUS_TIMESTAMP = {
    OrderStatus.CONFIRMED: "confirmed_at",
    OrderStatus.SHIPPED: "shipped_at",
    OrderStatus.DELIVERED: "delivered_at",
    OrderStatus.CANCELLED: "cancelled_at",
}


async def _transition(
    work: UnitOfWork,
    cmd: OrderCommand,
    target: OrderStatus,
    build: Callable[[dict[str, Any]], DomainEvent],
    extra: dict[str, Any] | None = None,
) -> tuple[str, int]:
    """Move an order to ``target`` if the rules allow it; ``build`` makes the event."""
    changes = {
        "status": target.value,
        "updated_at": work.occurred_at,
        _STATUS_TIMESTAMP[target]: work.occurred_at,
        **(extra or {}),
    }
    row, version = await _change_order(work.conn, cmd.order_id, cmd.expected_version, changes)
    current = OrderStatus(row["status"])
    check_transition(str(cmd.order_id), current, target)
    _saved(row, cmd.order_id)
    common = {
        "order_id": str(cmd.order_id),
        "customer_id": str(row["customer_id"]),
        "total": Decimal(row["total"]),
        "previous_status": current,
        "status": target,
    }
    work.record("order", str(cmd.order_id), version, build(common))
    return str(cmd.order_id), version


async def confirm_order(work: UnitOfWork, cmd: ConfirmOrder) -> tuple[str, int]:
    return await _transition(work, cmd, OrderStatus.CONFIRMED, lambda c: OrderConfirmed(**c))


async def ship_order(work: UnitOfWork, cmd: ShipOrder) -> tuple[str, int]:
    extra = {"tracking_number": cmd.tracking_number, "carrier": cmd.carrier}
    return await _transition(
        work, cmd, OrderStatus.SHIPPED, lambda c: OrderShipped(**c, **extra), extra
    )


async def deliver_order(work: UnitOfWork, cmd: DeliverOrder) -> tuple[str, int]:
    return await _transition(work, cmd, OrderStatus.DELIVERED, lambda c: OrderDelivered(**c))


async def cancel_order(work: UnitOfWork, cmd: CancelOrder) -> tuple[str, int]:
    return await _transition(
        work,
        cmd,
        OrderStatus.CANCELLED,
        lambda c: OrderCancelled(**c, reason=cmd.reason),
        {"cancel_reason": cmd.reason},
    )


async def change_shipping_address(work: UnitOfWork, cmd: ChangeShippingAddress) -> tuple[str, int]:
    address = cmd.shipping_address
    changes = {
        "street": address.street,
        "city": address.city,
        "postal_code": address.postal_code,
        "country": address.country,
        "updated_at": work.occurred_at,
    }
    row, version = await _change_order(work.conn, cmd.order_id, cmd.expected_version, changes)
    check_address_change(str(cmd.order_id), OrderStatus(row["status"]))
    _saved(row, cmd.order_id)
    event = ShippingAddressChanged(order_id=str(cmd.order_id), shipping_address=address)
    work.record("order", str(cmd.order_id), version, event)
    return str(cmd.order_id), version


def _handler(fn: Callable[[UnitOfWork, Any], Awaitable[tuple[str, int]]]) -> Handler:
    return fn


ORDER_HANDLERS: dict[type, Handler] = {
    RegisterCustomer: _handler(register_customer),
    RegisterProduct: _handler(register_product),
    CreateOrder: _handler(create_order),
    ConfirmOrder: _handler(confirm_order),
    ShipOrder: _handler(ship_order),
    DeliverOrder: _handler(deliver_order),
    CancelOrder: _handler(cancel_order),
    ChangeShippingAddress: _handler(change_shipping_address),
}
