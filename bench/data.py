"""Realistic event streams for the benchmarks, and the fast ways to load them.

The stream is the orders demo's data (``projections.orders.demo``: the same
customers, catalog, journeys and address changes) spread over time: every
order starts at a random moment of a 30-day window and each step of its life
(confirm, change address, ship, deliver or cancel) follows after a realistic
delay. Sorted by time, many orders' lives interleave as a real shop's would.
The stream opens with the product and customer registrations. The same
``(total, seed)`` always gives the same events, ids and times.

Loading 200,000 or 1,000,000 events through the command bus one by one would
take longer than the benchmarks themselves, so they are loaded in bulk:
produced straight to Kafka with the engine's codec and partitioning (what the
relay would send), or copied into the event log (and outbox) with COPY.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aiokafka import AIOKafkaProducer

from engine import DomainEvent, EventEnvelope, KafkaSettings, Projected, partition_for
from engine.codec import encode
from engine.postgres.pool import Connection
from projections.orders.demo import (
    STEP_TARGET,
    CustomerPlan,
    OrderPlan,
    Step,
    plan_customer,
    plan_order,
    product_id,
)
from projections.orders.demo_data import CATALOG
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
from projections.orders.rules import OrderStatus

BASE_TIME = datetime(2025, 3, 1, tzinfo=UTC)
WINDOW_S = 30 * 86_400
# (shortest, longest) delay before each step, in seconds.
STEP_DELAY_S: dict[Step, tuple[float, float]] = {
    Step.CONFIRM: (300, 6 * 3600),
    Step.CHANGE_ADDRESS: (60, 86_400),
    Step.SHIP: (6 * 3600, 2 * 86_400),
    Step.DELIVER: (86_400, 4 * 86_400),
    Step.CANCEL: (60, 2 * 86_400),
}
EVENTS_PER_ORDER = 3.4  # about what the demo's journeys average, before the window cuts
ORDERS_PER_CUSTOMER = 8
_STATUS_EVENT = {
    Step.CONFIRM: OrderConfirmed,
    Step.DELIVER: OrderDelivered,
}


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


class EventStream:
    """``total`` events of order life cycles; iterate to get them in position order."""

    def __init__(self, total: int, seed: int = 7, first_position: int = 1) -> None:
        if total < 1:
            raise ValueError("a stream has at least one event")
        self.total = total
        self.seed = seed
        self.first_position = first_position
        orders = max(1, int(total / EVENTS_PER_ORDER))
        self.customers = tuple(
            plan_customer(seed, n) for n in range(max(1, orders // ORDERS_PER_CUSTOMER))
        )
        self.prefix = min(total, len(CATALOG) + len(self.customers))
        while True:
            self.orders = tuple(plan_order(seed, n, self.customers) for n in range(orders))
            self._timeline = self._plan_timeline()
            if len(self._timeline) >= total - self.prefix:
                break
            orders = int(orders * 1.1) + 10
        del self._timeline[total - self.prefix :]
        self.order_ids = sorted({str(self.orders[n].order_id) for _, n, _ in self._timeline})

    def _plan_timeline(self) -> list[tuple[float, int, int]]:
        """(seconds into the window, order number, step number): step 0 is the creation."""
        timeline: list[tuple[float, int, int]] = []
        for number, order in enumerate(self.orders):
            rng = random.Random(f"{self.seed}/bench/order/{number}")
            at = rng.uniform(0, WINDOW_S)
            timeline.append((at, number, 0))
            for k, step in enumerate(order.steps, start=1):
                at += rng.uniform(*STEP_DELAY_S[step])
                timeline.append((at, number, k))
        timeline.sort()
        return timeline

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Projected]:
        rng = random.Random(f"{self.seed}/bench/ids")
        position = self.first_position
        for aggregate, version, at, event in self._events():
            envelope = EventEnvelope(
                event_id=_uuid(rng),
                event_type=event.event_type,
                schema_version=event.schema_version,
                aggregate_type=aggregate[0],
                aggregate_id=aggregate[1],
                aggregate_version=version,
                position=position,
                occurred_at=at,
                correlation_id=_uuid(rng),
                causation_id=_uuid(rng),
                payload=event.model_dump(mode="json"),
            )
            position += 1
            yield Projected(envelope, event)

    def _events(self) -> Iterator[tuple[tuple[str, str], int, datetime, DomainEvent]]:
        opening = [*_product_events(), *(_customer_event(c) for c in self.customers)]
        for event, aggregate in opening[: self.prefix]:
            yield aggregate, 1, BASE_TIME - timedelta(days=1), event
        created: dict[int, tuple[str, Decimal]] = {}  # order -> (customer id, total)
        for at, number, step in self._timeline:
            order = self.orders[number]
            when = BASE_TIME + timedelta(seconds=at)
            if step == 0:
                event = self._created(order)
                created[number] = (event.customer_id, event.total)
            else:
                event = _step_event(order, step, *created[number])
            yield ("order", str(order.order_id)), step + 1, when, event

    def _created(self, order: OrderPlan) -> OrderCreated:
        customer = self.customers[order.customer]
        lines = [
            OrderLine(
                product_id=str(product_id(index)),
                product_name=CATALOG[index][0],
                quantity=quantity,
                unit_price=CATALOG[index][1],
                line_total=CATALOG[index][1] * quantity,
            )
            for index, quantity in order.items
        ]
        return OrderCreated(
            order_id=str(order.order_id),
            customer_id=str(customer.customer_id),
            customer_name=customer.name,
            customer_email=customer.email,
            items=lines,
            item_count=sum(line.quantity for line in lines),
            total=sum((line.line_total for line in lines), Decimal("0.00")),
            shipping_address=order.address,
        )


def _product_events() -> list[tuple[DomainEvent, tuple[str, str]]]:
    return [
        (
            ProductRegistered(product_id=str(product_id(i)), name=name, price=price),
            ("product", str(product_id(i))),
        )
        for i, (name, price) in enumerate(CATALOG)
    ]


def _customer_event(customer: CustomerPlan) -> tuple[DomainEvent, tuple[str, str]]:
    event = CustomerRegistered(
        customer_id=str(customer.customer_id), name=customer.name, email=customer.email
    )
    return event, ("customer", str(customer.customer_id))


def status_before(order: OrderPlan, step: int) -> OrderStatus:
    """The order's status after its first ``step - 1`` steps."""
    status = OrderStatus.PENDING
    for done in order.steps[: step - 1]:
        status = STEP_TARGET[done] or status
    return status


def _step_event(order: OrderPlan, step: int, customer_id: str, total: Decimal) -> DomainEvent:
    kind = order.steps[step - 1]
    if kind is Step.CHANGE_ADDRESS:
        return ShippingAddressChanged(
            order_id=str(order.order_id), shipping_address=order.new_address
        )
    target = STEP_TARGET[kind]
    assert target is not None  # every step but CHANGE_ADDRESS moves the status
    common = {
        "order_id": str(order.order_id),
        "customer_id": customer_id,
        "total": total,
        "previous_status": status_before(order, step),
        "status": target,
    }
    if kind is Step.SHIP:
        return OrderShipped(**common, tracking_number=order.tracking_number, carrier=order.carrier)
    if kind is Step.CANCEL:
        return OrderCancelled(**common, reason=order.cancel_reason)
    return _STATUS_EVENT[kind](**common)


# -- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    """What :func:`produce` wrote: how many messages, and each partition's end offset."""

    count: int
    end_offsets: dict[int, int]


async def produce(kafka: KafkaSettings, items: Iterable[Projected], window: int = 5000) -> Produced:
    """Send ``items`` to the topic as the relay would (codec, key, explicit partition)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        acks=1,
        linger_ms=20,
        max_batch_size=1024 * 1024,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    await producer.start()
    counts: dict[int, int] = dict.fromkeys(range(kafka.partitions), 0)
    count = 0
    try:
        pending: list[asyncio.Future[object]] = []
        for item in items:
            record = encode(item.envelope)
            partition = partition_for(item.aggregate_id, kafka.partitions)
            pending.append(
                await producer.send(
                    kafka.topic, record.value, record.key, partition, headers=record.headers
                )
            )
            counts[partition] += 1
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return Produced(count, counts)


_LOG_COLUMNS = (
    "event_id",
    "event_type",
    "schema_version",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "payload",
)


def log_row(envelope: EventEnvelope) -> tuple[object, ...]:
    return (
        envelope.event_id,
        envelope.event_type,
        envelope.schema_version,
        envelope.aggregate_type,
        envelope.aggregate_id,
        envelope.aggregate_version,
        envelope.occurred_at,
        envelope.correlation_id,
        envelope.causation_id,
        json.dumps(envelope.payload, separators=(",", ":")),
    )


async def copy_to_log(
    conn: Connection, items: Iterable[Projected], *, outbox: bool, chunk: int = 20_000
) -> int:
    """COPY ``items`` into the event log (positions assigned in order); queue them if ``outbox``.

    The outbox rows are added in one statement after the copy, as if every
    event had been committed but not yet published: the relay's backlog.
    """
    before = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM engine_event_log"))
    rows: list[tuple[object, ...]] = []
    copied = 0
    for item in items:
        rows.append(log_row(item.envelope))
        if len(rows) >= chunk:
            copied += await _copy(conn, rows)
            rows = []
    if rows:
        copied += await _copy(conn, rows)
    if outbox:
        await conn.execute(
            "INSERT INTO engine_outbox (position)"
            " SELECT position FROM engine_event_log WHERE position > $1",
            before,
        )
    return copied


async def _copy(conn: Connection, rows: list[tuple[object, ...]]) -> int:
    await conn.copy_records_to_table("engine_event_log", records=rows, columns=_LOG_COLUMNS)
    return len(rows)
