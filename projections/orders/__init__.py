"""The orders domain: customers, products, orders with items, and their life cycle.

Built on the engine's public API only (``import engine``).
"""

from engine import Application
from projections.orders.api import build_router
from projections.orders.commands import (
    Address,
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    OrderItemRequest,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)
from projections.orders.demo import load_orders_demo
from projections.orders.events import registry
from projections.orders.handlers import ORDER_HANDLERS
from projections.orders.rules import InvalidTransitionError, OrderStatus
from projections.orders.schema import ORDERS_MIGRATIONS
from projections.orders.wiring import build_projections

APP = Application(
    name="orders",
    migrations=ORDERS_MIGRATIONS,
    handlers=ORDER_HANDLERS,
    registry=registry,
    projections=build_projections,
    demo=load_orders_demo,
    api=build_router,
)

__all__ = [
    "APP",
    "ORDERS_MIGRATIONS",
    "ORDER_HANDLERS",
    "Address",
    "CancelOrder",
    "ChangeShippingAddress",
    "ConfirmOrder",
    "CreateOrder",
    "DeliverOrder",
    "InvalidTransitionError",
    "OrderItemRequest",
    "OrderStatus",
    "RegisterCustomer",
    "RegisterProduct",
    "ShipOrder",
    "registry",
]
