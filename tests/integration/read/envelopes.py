"""Events of an order as JSON envelopes, to produce straight to the topic in tests."""

from __future__ import annotations

import json
import uuid
from typing import Any


def order_event(
    order: str, customer: str, event_type: str, schema_version: int, version: int, **extra: Any
) -> bytes:
    """Order ``order``'s event at aggregate ``version``, as a producer would write it."""
    previous, status = {"OrderShipped": ("PENDING", "SHIPPED")}.get(
        event_type, ("SHIPPED", "DELIVERED")
    )
    return json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": event_type,
            "schema_version": schema_version,
            "aggregate_type": "order",
            "aggregate_id": order,
            "aggregate_version": version,
            "position": 10**9 + version,
            "occurred_at": f"2026-01-0{version}T00:00:00+00:00",
            "correlation_id": str(uuid.uuid4()),
            "causation_id": str(uuid.uuid4()),
            "payload": {
                "order_id": order,
                "customer_id": customer,
                "total": "19.99",
                "previous_status": previous,
                "status": status,
                **extra,
            },
        }
    ).encode()
