"""Events and lock probes for the generation tests: hand-made, so a test controls each write."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from engine import EventEnvelope
from engine.generations import fence_key
from engine.postgres import outbox
from engine.postgres.pool import Connection
from projections.orders.commands import Address
from projections.orders.events import OrderCreated, OrderLine

LogRow = tuple[uuid.UUID, str, int, str, str, int, datetime, uuid.UUID, uuid.UUID, str]


def order_created(order_id: str, customer_name: str = "Ada Lovelace") -> LogRow:
    """An ``outbox.append`` row: version 1 of a new order."""
    event = OrderCreated(
        order_id=order_id,
        customer_id=str(uuid.uuid4()),
        customer_name=customer_name,
        customer_email="ada@example.com",
        items=[
            OrderLine(
                product_id=str(uuid.uuid4()),
                product_name="Difference Engine",
                quantity=1,
                unit_price=Decimal("19.99"),
                line_total=Decimal("19.99"),
            )
        ],
        item_count=1,
        total=Decimal("19.99"),
        shipping_address=Address(street="1 Way", city="London", postal_code="N1", country="UK"),
    )
    command = uuid.uuid4()
    return (
        uuid.uuid4(),
        event.event_type,
        event.schema_version,
        "order",
        order_id,
        1,
        datetime.now(UTC),
        command,
        command,
        event.model_dump_json(),
    )


async def append_one(conn: Connection, order_id: str) -> EventEnvelope:
    """Append version 1 of ``order_id`` in ``conn``'s open transaction; its envelope."""
    (envelope,) = await outbox.append(conn, [order_created(order_id)])
    return envelope


async def fence_waiters(pool: asyncpg.Pool, projection: str, mode: str) -> list[int]:
    """Backends waiting (not granted) for the projection's fence lock in ``mode``."""
    rows = await pool.fetch(
        """
        SELECT l.pid FROM pg_locks l
        WHERE l.locktype = 'advisory' AND NOT l.granted AND l.mode = $2 AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::int8 = (hashtextextended($1, 0) >> 32) & 4294967295
          AND l.objid::int8 = hashtextextended($1, 0) & 4294967295
        """,
        fence_key(projection),
        mode,
    )
    return [int(r["pid"]) for r in rows]


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for_fence_waiter(
    pool: asyncpg.Pool, projection: str, mode: str, timeout_s: float = 30.0
) -> int:
    """The pid of the first backend seen waiting for the fence in ``mode``."""
    pids: list[int] = []

    async def waiting() -> bool:
        pids[:] = await fence_waiters(pool, projection, mode)
        return bool(pids)

    await until(waiting, f"a {mode} waiter on the fence of {projection}", timeout_s)
    return pids[0]
