"""Odd events never stop the daemon: each is dead-lettered and its partition flows on.

(And poison that arrives while its dead letter cannot be recorded waits for
Postgres, instead of ending the daemon, which would restart at the same offset
and end again for as long as the outage lasts.)

Each message here is produced straight to the topic, as a buggy or newer
producer would: an envelope whose ``occurred_at`` has no time zone (next to
events that have one), and an old ``OrderShipped`` v1 whose payload lacks the
field its upcaster reads (the upcaster raises ``KeyError``, not a
``PoisonError``). After them, a real event of the same aggregate on the same
partition must still be applied.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence

import asyncpg

from engine import CommandBus, OutboxRelay, Resources, ServiceUnavailableError, Settings
from engine.daemon import build_runner
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from projections.orders import APP, ConfirmOrder
from tests.helpers import new_customer, new_order, new_product
from tests.integration.read.faults import produce_to_topic


def _envelope(order: str, event_type: str, schema_version: int, **fields: object) -> bytes:
    body = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": schema_version,
        "aggregate_type": "order",
        "aggregate_id": order,
        "aggregate_version": 2,
        "position": 10**9,
        "occurred_at": "2026-01-01T00:00:00+00:00",
        "correlation_id": str(uuid.uuid4()),
        "causation_id": str(uuid.uuid4()),
        "payload": {"order_id": order},
    }
    body.update(fields)
    return json.dumps(body).encode()


async def test_naive_times_and_failing_upcasters_are_dead_lettered_not_fatal(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    kafka = settings_for_test.kafka
    customer, product = await new_customer(bus), await new_product(bus)
    order = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    await OutboxRelay(settings_for_test.postgres, kafka, settings_for_test.relay).drain()

    odd = [
        # No time zone, while every other event has one (a valid event otherwise).
        _envelope(
            order,
            "OrderConfirmed",
            1,
            occurred_at="2026-01-01T00:00:00",
            payload={
                "order_id": order,
                "customer_id": customer,
                "total": "19.99",
                "previous_status": "PENDING",
                "status": "CONFIRMED",
            },
        ),
        # v1 without "tracking_code": the upcaster's KeyError.
        _envelope(order, "OrderShipped", 1),
    ]
    await produce_to_topic(settings_for_test, order, odd)
    await bus.execute(ConfirmOrder(order_id=uuid.UUID(order)))
    await OutboxRelay(settings_for_test.postgres, kafka, settings_for_test.relay).drain()

    runner = build_runner(APP, resources)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)

    row = await pool.fetchrow("SELECT status, version FROM order_details WHERE id = $1", order)
    assert row is not None and (row["status"], row["version"]) == ("CONFIRMED", 2)
    letters = await DeadLetterStore(pool).list()
    assert sorted(d.value for d in letters) == sorted(odd)
    assert all(d.projection == "*" for d in letters)
    errors = " | ".join(d.error for d in letters)
    assert "time zone" in errors and "tracking_code" in errors, errors


class _Outage(DeadLetterStore):
    """The real dead-letter store, unreachable for its first ``failures`` writes."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        super().__init__(pool)
        self.failures = failures

    async def record(self, letters: Sequence[NewDeadLetter]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ServiceUnavailableError("PostgreSQL", "127.0.0.1:54329 (fault injected)")
        await super().record(letters)


async def test_poison_arriving_while_dead_letters_cannot_be_recorded_waits_instead_of_crashing(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    kafka = settings_for_test.kafka
    customer, product = await new_customer(bus), await new_product(bus)
    order = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    await OutboxRelay(settings_for_test.postgres, kafka, settings_for_test.relay).drain()
    await produce_to_topic(settings_for_test, order, [b"\x00not json"])
    await bus.execute(ConfirmOrder(order_id=uuid.UUID(order)))
    await OutboxRelay(settings_for_test.postgres, kafka, settings_for_test.relay).drain()

    outage = _Outage(pool, failures=3)
    runner = build_runner(APP, resources, dead_letters=outage)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)

    assert outage.failures == 0
    letters = await DeadLetterStore(pool).list()
    assert [(d.projection, d.value) for d in letters] == [("*", b"\x00not json")]
    row = await pool.fetchrow("SELECT status, version FROM order_details WHERE id = $1", order)
    assert row is not None and (row["status"], row["version"]) == ("CONFIRMED", 2)
