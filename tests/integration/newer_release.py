"""The orders application as a newer release builds it: its registry knows OrderShipped v3.

What "deploying the fix" means in the fault soak: an ``engine`` process run
with ``ENGINE_APP=tests.integration.newer_release:NEXT`` decodes the
``OrderShipped`` schema version 3 that the running daemons dead-lettered as
unknown. The v3 model is the current one with ``schema_version = 3`` and an
identity upcaster from v2 (the v3 payload adds nothing the projections read),
so every event the old release wrote still decodes to the same values.
"""

from __future__ import annotations

from engine import Application, EventRegistry
from projections.orders import APP
from projections.orders.events import OrderShipped, _order_shipped_v1_to_v2


class OrderShippedV3(OrderShipped):
    """OrderShipped as the newer release writes it."""

    schema_version = 3


def newer_release() -> Application:
    """The orders application with a registry that knows OrderShipped v3."""
    registry = EventRegistry()
    for event_type in sorted(APP.registry.event_types):
        model = APP.registry.model_for(event_type)
        registry.register(OrderShippedV3 if model is OrderShipped else model)
    registry.upcaster("OrderShipped", 1)(_order_shipped_v1_to_v2)
    registry.upcaster("OrderShipped", 2)(lambda payload: payload)
    return Application("orders-next", APP.migrations, APP.handlers, registry, APP.projections)


NEXT = newer_release()
