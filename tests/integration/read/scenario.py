"""A realistic, seeded mix of order life cycles, driven through the real command bus."""

from __future__ import annotations

import contextlib
import random
import uuid

from engine import CommandBus, ConflictError, RuleViolationError
from projections.orders import (
    Address,
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    DeliverOrder,
    ShipOrder,
)
from tests.helpers import new_customer, new_order, new_product

CITIES = ("London", "Paris", "Berlin", "Lisbon", "Oslo")


async def populate(bus: CommandBus, orders: int, seed: int = 7) -> list[str]:
    """Create customers, products and ``orders`` orders, each walked through a random life."""
    rng = random.Random(seed)
    customers = [
        await new_customer(bus, name) for name in ("Ada Lovelace", "Alan Turing", "Grace Hopper")
    ]
    products = [
        await new_product(bus, name, price)
        for name, price in (
            ("Difference Engine", "19.99"),
            ("Jacquard Loom", "5.00"),
            ("Enigma Rotor", "42.50"),
            ("Punch Card", "0.10"),
        )
    ]
    ids = []
    for _ in range(orders):
        items = [(p, rng.randint(1, 5)) for p in rng.sample(products, rng.randint(1, 3))]
        created = await new_order(bus, rng.choice(customers), items)
        order_id = uuid.UUID(created.aggregate_id)
        ids.append(created.aggregate_id)
        await _live(bus, order_id, rng)
    return ids


async def _live(bus: CommandBus, order_id: uuid.UUID, rng: random.Random) -> None:
    steps = [
        lambda: ConfirmOrder(order_id=order_id),
        lambda: ShipOrder(
            order_id=order_id,
            tracking_number=f"TRK-{rng.randint(1000, 9999)}",
            carrier=rng.choice(("DHL", "UPS")),
        ),
        lambda: DeliverOrder(order_id=order_id),
    ]
    for step in steps[: rng.randint(0, 3)]:
        if rng.random() < 0.3:
            city = rng.choice(CITIES)
            address = Address(street="2 New Street", city=city, postal_code="1000", country="EU")
            with contextlib.suppress(RuleViolationError):  # already shipped: the rule holds
                await bus.execute(
                    ChangeShippingAddress(order_id=order_id, shipping_address=address)
                )
        if rng.random() < 0.15:
            with contextlib.suppress(RuleViolationError, ConflictError):  # too late to cancel
                await bus.execute(CancelOrder(order_id=order_id, reason="customer request"))
            return
        await bus.execute(step())
