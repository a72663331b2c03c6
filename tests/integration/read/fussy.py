"""Fussy: an orders projection with a bug, for dead-letter tests (it refuses some customers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from engine import (
    Application,
    Document,
    DocumentProjection,
    PostgresDocumentStore,
    Projected,
    Projection,
    ProjectionStore,
    Resources,
)
from projections.orders import APP
from projections.orders.events import OrderCreated
from projections.orders.wiring import build_projections


class Fussy(DocumentProjection):
    """Refuses orders of one customer until told otherwise: a projection with a bug."""

    name = "fussy"
    handles = frozenset({OrderCreated.event_type})
    refused: ClassVar[set[str]] = set()
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, name text, version int NOT NULL)"
    )

    def apply(self, doc: Document | None, item: Projected) -> Document:
        assert isinstance(item.event, OrderCreated)
        if item.event.customer_name in self.refused:
            raise ValueError(f"cannot handle {item.event.customer_name}")
        return {"name": item.event.customer_name}


def app_with_fussy() -> Application:
    def projections(resources: Resources) -> Sequence[tuple[Projection, ProjectionStore]]:
        fussy = Fussy()
        store = PostgresDocumentStore(resources.pool, fussy, "fussy_orders", Fussy.SCHEMA)
        return [*build_projections(resources), (fussy, store)]

    return Application("orders+fussy", APP.migrations, APP.handlers, APP.registry, projections)
