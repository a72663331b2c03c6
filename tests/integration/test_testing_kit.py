"""engine.testing against the real stack: projections in their stores, commands in Postgres."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import pytest

from engine import (
    ConflictError,
    NotFoundError,
    PostgresDocumentStore,
    PostgresSqlStore,
    RedisHashStore,
    Resources,
    Settings,
)
from engine.testing import (
    CommandScenario,
    EventStream,
    as_redis_hash,
    given,
    project,
    project_into,
)
from projections.orders import (
    APP,
    ConfirmOrder,
    CreateOrder,
    InvalidTransitionError,
    OrderItemRequest,
    OrderStatus,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)
from projections.orders.events import OrderConfirmed, OrderShipped
from projections.orders.views import OrderDetails, OrderQuickLookup, OrderStats
from projections.orders.wiring import quick_lookup_prefix
from tests.helpers import ADDRESS
from tests.unit.test_testing_kit import confirmed, created, shipped

# -- projections in their real stores -------------------------------------------------


async def test_order_details_in_the_postgres_document_store(resources: Resources) -> None:
    details = OrderDetails()
    store = PostgresDocumentStore(resources.pool, details, "order_details", OrderDetails.SCHEMA)
    stream = given(created("o1"), confirmed("o1"), shipped("o1"), aggregate_id="o1")

    assert await project_into((details, store), stream, batch_size=2) > 0

    row = await resources.pool.fetchrow(
        "SELECT status, tracking_number, total, version FROM order_details WHERE id = 'o1'"
    )
    assert row is not None
    assert dict(row) == {
        "status": "SHIPPED",
        "tracking_number": "TRK-1",
        "total": Decimal("12.50"),
        "version": 3,
    }
    assert await project_into((details, store), stream) == 0  # redelivery changes nothing


async def test_quick_lookup_in_redis_matches_the_in_memory_fold(resources: Resources) -> None:
    quick = OrderQuickLookup()
    store = RedisHashStore(resources.redis, quick, quick_lookup_prefix(resources))
    stream = given(created("o1"), confirmed("o1"), shipped("o1"), aggregate_id="o1")

    await project_into((quick, store), stream, batch_size=1)

    stored = await resources.redis.hgetall(f"{store.key_prefix}o1")
    assert stored == {**as_redis_hash(project(quick, stream)["o1"]), "_v": "3"}
    assert stored["status"] == "SHIPPED"


async def test_order_stats_sql_projection_in_postgres(resources: Resources) -> None:
    stats = OrderStats()
    pair = (stats, PostgresSqlStore(resources.pool, stats))
    stream = EventStream().add("o1", created("o1"), confirmed("o1")).add("o2", created("o2"))

    await project_into(pair, stream)
    assert await project_into(pair, stream) == 0

    rows = await resources.pool.fetch(
        "SELECT status, orders, revenue FROM order_stats_daily ORDER BY status"
    )
    assert [tuple(r) for r in rows] == [
        ("CONFIRMED", 1, Decimal("12.50")),
        ("PENDING", 1, Decimal("12.50")),
    ]


# -- command handlers through the real CommandBus ----------------------------------------


@pytest.fixture
def scenario(pool: asyncpg.Pool, settings_for_test: Settings) -> CommandScenario:
    return CommandScenario(pool, APP, settings_for_test.postgres)


async def an_order(scenario: CommandScenario) -> tuple[uuid.UUID, uuid.UUID]:
    """Given a customer, a product and a pending order of two of it: (customer, order)."""
    customer, product, order = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await scenario.given(
        RegisterCustomer(customer_id=customer, name="Ada", email="ada@example.com"),
        RegisterProduct(product_id=product, name="Loom", price=Decimal("6.25")),
        CreateOrder(
            order_id=order,
            customer_id=customer,
            items=[OrderItemRequest(product_id=product, quantity=2)],
            shipping_address=ADDRESS,
        ),
    )
    return customer, order


async def test_confirming_a_pending_order_records_order_confirmed(
    scenario: CommandScenario,
) -> None:
    customer, order = await an_order(scenario)

    outcome = await scenario.when(ConfirmOrder(order_id=order))

    outcome.expect_events(
        OrderConfirmed(
            order_id=str(order),
            customer_id=str(customer),
            total=Decimal("12.50"),
            previous_status=OrderStatus.PENDING,
            status=OrderStatus.CONFIRMED,
        )
    )
    assert [e.aggregate_version for e in outcome.envelopes] == [2]


async def test_rejected_commands_give_their_typed_error(scenario: CommandScenario) -> None:
    _, order = await an_order(scenario)

    shipped_early = await scenario.when(ShipOrder(order_id=order, tracking_number="T"))
    error = shipped_early.expect_error(InvalidTransitionError, match="PENDING")
    assert error.target is OrderStatus.SHIPPED
    with pytest.raises(AssertionError, match="raised InvalidTransitionError"):
        shipped_early.expect_events(OrderShipped)

    stale = await scenario.when(ConfirmOrder(order_id=order, expected_version=2))
    stale.expect_error(ConflictError, match="version 1")
    missing = await scenario.when(ConfirmOrder(order_id=uuid.uuid4()))
    missing.expect_error(NotFoundError)


async def test_a_repeated_command_records_nothing_the_second_time(
    scenario: CommandScenario,
) -> None:
    _, order = await an_order(scenario)
    confirm = ConfirmOrder(order_id=order)

    (await scenario.when(confirm)).expect_events(OrderConfirmed)
    again = await scenario.when(confirm)

    again.expect_events()
    assert again.result is not None and again.result.duplicate
