"""Commands against the real Postgres write model: rules, errors, atomicity, idempotency."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal

import asyncpg
import pytest

from engine import (
    CommandBus,
    CommandIdReusedError,
    ConflictError,
    NotFoundError,
    RuleViolationError,
    Settings,
    ValidationFailedError,
    validate_command,
)
from engine.postgres import outbox
from projections.orders import (
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    InvalidTransitionError,
    OrderItemRequest,
    OrderStatus,
    ShipOrder,
)
from tests.helpers import ADDRESS, new_customer, new_order, new_product
from tests.integration.read.generation_kit import order_created


async def _log(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT event_type, aggregate_id, aggregate_version, position, payload"
        " FROM engine_event_log ORDER BY position"
    )


async def test_order_life_cycle_updates_the_write_model_and_records_each_event(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    customer = await new_customer(bus)
    engine_ = await new_product(bus, "Difference Engine", "19.99")
    loom = await new_product(bus, "Jacquard Loom", "5.00")
    created = await new_order(bus, customer, [(engine_, 2), (loom, 3), (engine_, 1)])
    order = uuid.UUID(created.aggregate_id)
    assert created.version == 1
    for command in (
        ConfirmOrder(order_id=order),
        ShipOrder(order_id=order, tracking_number="TRK-1", carrier="Royal Mail"),
        DeliverOrder(order_id=order),
    ):
        await bus.execute(command)

    row = await pool.fetchrow("SELECT * FROM orders WHERE id = $1", order)
    assert row["status"] == "DELIVERED"
    assert row["version"] == 4
    assert row["total"] == Decimal("74.97")  # 3 x 19.99 + 3 x 5.00, priced by the domain
    assert row["tracking_number"] == "TRK-1"
    assert row["confirmed_at"] <= row["shipped_at"] <= row["delivered_at"]
    items = await pool.fetch(
        "SELECT product_name, quantity FROM order_items WHERE order_id = $1 ORDER BY line_no", order
    )
    assert [(i["product_name"], i["quantity"]) for i in items] == [
        ("Difference Engine", 3),
        ("Jacquard Loom", 3),
    ]
    order_events = [e for e in await _log(pool) if e["aggregate_id"] == str(order)]
    assert [(e["event_type"], e["aggregate_version"]) for e in order_events] == [
        ("OrderCreated", 1),
        ("OrderConfirmed", 2),
        ("OrderShipped", 3),
        ("OrderDelivered", 4),
    ]
    assert created.position == order_events[0]["position"]


async def test_order_created_carries_what_projections_denormalize(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    customer = await new_customer(bus, "Grace Hopper")
    product = await new_product(bus, "Compiler", "100.00")
    created = await new_order(bus, customer, [(product, 2)])
    data = json.loads((await _log(pool))[-1]["payload"])
    assert data["customer_name"] == "Grace Hopper"
    assert data["customer_email"].endswith("@example.com")
    assert data["items"][0]["product_name"] == "Compiler"
    assert Decimal(data["total"]) == Decimal("200.00")
    assert data["item_count"] == 2
    assert data["order_id"] == created.aggregate_id


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"items": []}, "items"),
        ({"items": [{"product_id": str(uuid.uuid4()), "quantity": 0}]}, "items.0.quantity"),
        ({"items": [{"product_id": "not-a-uuid", "quantity": 1}]}, "items.0.product_id"),
        ({"unit_price": "0.01"}, "unit_price"),  # prices come from the catalog, never the client
        (
            {"shipping_address": {"street": "", "city": "x", "postal_code": "1", "country": "UK"}},
            "shipping_address.street",
        ),
    ],
)
def test_invalid_commands_name_the_failing_field(data: dict[str, object], field: str) -> None:
    valid: dict[str, object] = {
        "customer_id": str(uuid.uuid4()),
        "items": [{"product_id": str(uuid.uuid4()), "quantity": 1}],
        "shipping_address": ADDRESS.model_dump(),
    }
    with pytest.raises(ValidationFailedError) as caught:
        validate_command(CreateOrder, {**valid, **data})
    assert caught.value.field == field


async def test_invalid_transition_names_both_states_and_changes_nothing(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    created = await new_order(bus, customer, [(product, 1)])
    before = len(await _log(pool))
    with pytest.raises(InvalidTransitionError) as caught:
        await bus.execute(DeliverOrder(order_id=uuid.UUID(created.aggregate_id)))
    assert "PENDING" in str(caught.value) and "DELIVERED" in str(caught.value)
    assert (caught.value.current, caught.value.target) == (
        OrderStatus.PENDING,
        OrderStatus.DELIVERED,
    )
    assert len(await _log(pool)) == before
    assert await pool.fetchval("SELECT version FROM orders") == 1


async def test_nothing_leaves_cancelled_and_address_is_fixed_once_shipped(bus: CommandBus) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    cancelled = uuid.UUID((await new_order(bus, customer, [(product, 1)])).aggregate_id)
    await bus.execute(CancelOrder(order_id=cancelled, reason="changed my mind"))
    with pytest.raises(InvalidTransitionError):
        await bus.execute(ConfirmOrder(order_id=cancelled))
    shipped = uuid.UUID((await new_order(bus, customer, [(product, 1)])).aggregate_id)
    await bus.execute(ChangeShippingAddress(order_id=shipped, shipping_address=ADDRESS))
    await bus.execute(ConfirmOrder(order_id=shipped))
    await bus.execute(ShipOrder(order_id=shipped, tracking_number="T"))
    with pytest.raises(RuleViolationError, match="before the order ships"):
        await bus.execute(ChangeShippingAddress(order_id=shipped, shipping_address=ADDRESS))
    with pytest.raises(InvalidTransitionError):
        await bus.execute(CancelOrder(order_id=shipped, reason="too late"))


async def test_unknown_ids_are_not_found_and_record_nothing(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    with pytest.raises(NotFoundError, match="order"):
        await bus.execute(ConfirmOrder(order_id=uuid.uuid4()))
    with pytest.raises(NotFoundError, match="customer"):
        await new_order(bus, str(uuid.uuid4()), [(str(uuid.uuid4()), 1)])
    customer = await new_customer(bus)
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError, match=missing):
        await new_order(bus, customer, [(missing, 1)])
    assert await pool.fetchval("SELECT count(*) FROM engine_event_log") == 1  # the customer
    assert await pool.fetchval("SELECT count(*) FROM engine_commands") == 1


async def test_a_repeated_command_returns_the_first_result_and_records_nothing(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    created = await new_order(bus, customer, [(product, 1)])
    confirm = ConfirmOrder(order_id=uuid.UUID(created.aggregate_id))
    first = await bus.execute(confirm)
    again = await bus.execute(confirm)
    assert again.duplicate and not first.duplicate
    # The stored result (built by the append statement) is the one returned the first time.
    assert again.model_dump(exclude={"duplicate"}) == first.model_dump(exclude={"duplicate"})
    assert first.event_types == ["OrderConfirmed"]
    assert first.position == await pool.fetchval("SELECT max(position) FROM engine_event_log")
    assert await pool.fetchval("SELECT count(*) FROM engine_event_log") == 4


async def test_concurrent_duplicates_of_one_command_apply_once(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    command = CreateOrder(
        customer_id=uuid.UUID(customer),
        items=[OrderItemRequest(product_id=uuid.UUID(product), quantity=2)],
        shipping_address=ADDRESS,
    )
    results = await asyncio.gather(*(bus.execute(command) for _ in range(8)))
    assert len({r.aggregate_id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert await pool.fetchval("SELECT count(*) FROM orders") == 1
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM engine_event_log WHERE event_type = 'OrderCreated'"
        )
        == 1
    )


async def test_a_command_id_reused_for_other_content_is_refused(bus: CommandBus) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    created = await new_order(bus, customer, [(product, 1)])
    order = uuid.UUID(created.aggregate_id)
    command_id = uuid.uuid4()
    await bus.execute(CancelOrder(command_id=command_id, order_id=order, reason="a"))
    with pytest.raises(CommandIdReusedError):
        await bus.execute(CancelOrder(command_id=command_id, order_id=order, reason="b"))


async def test_expected_version_mismatch_is_a_conflict(bus: CommandBus) -> None:
    customer = await new_customer(bus)
    product = await new_product(bus)
    created = await new_order(bus, customer, [(product, 1)])
    order = uuid.UUID(created.aggregate_id)
    await bus.execute(ConfirmOrder(order_id=order, expected_version=1))
    with pytest.raises(ConflictError, match="version 2, not 1"):
        await bus.execute(CancelOrder(order_id=order, reason="x", expected_version=1))


async def test_the_relay_is_woken_by_commits_only(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings
) -> None:
    # The notification is sent inside the append statement: Postgres holds it until
    # the transaction commits and drops it on rollback.
    listener = await asyncpg.connect(settings_for_test.postgres.dsn())
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(
        outbox.NOTIFY_CHANNEL, lambda _conn, _pid, channel, _payload: heard.put_nowait(channel)
    )
    try:
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await outbox.append(conn, [order_created(str(uuid.uuid4()))])
                    raise RuntimeError("roll back")
        await new_customer(bus)
        # Notifications arrive in commit order: had the rolled-back one been sent, it
        # would be first; a round trip on the listener delivers anything pending.
        assert await asyncio.wait_for(heard.get(), timeout=10) == outbox.NOTIFY_CHANNEL
        await listener.fetchval("SELECT 1")
        assert heard.empty()
    finally:
        await listener.close()
    assert await pool.fetchval("SELECT count(*) FROM engine_event_log") == 1
