"""A rebuild replays every committed event, whatever order transaction ids and positions have.

Transaction ids are drawn at a command's first write (its claim), positions
later (at append), so xid order is not position order. Each test builds the
interleaving with transactions held open on separate connections.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine import Resources, Settings
from engine.rebuild import rebuild
from engine.stores.redis import RedisHashReader
from projections.orders import APP
from projections.orders.wiring import quick_lookup_prefix
from tests.integration.read.generation_kit import append_one, until


@pytest.fixture
async def sessions(settings_for_test: Settings) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three connections, each in an open transaction that has claimed its xid, in order."""
    conns = [await asyncpg.connect(settings_for_test.postgres.dsn()) for _ in range(3)]
    try:
        for conn in conns:
            await conn.execute("BEGIN")
            await conn.fetchval("SELECT pg_current_xact_id()")  # what a command's claim does
        yield conns
    finally:
        for conn in conns:
            await conn.close()


async def _in_new_generation(pool: asyncpg.Pool, resources: Resources, order_id: str) -> bool:
    details = await pool.fetchval("SELECT count(*) FROM order_details WHERE id = $1", order_id)
    quick = await RedisHashReader(resources.redis, quick_lookup_prefix(resources)).get(order_id)
    return details == 1 and quick is not None


async def _rebuild_both(resources: Resources, **options: float) -> None:
    for name in ("order_details", "order_quick_lookup"):
        report = await rebuild(APP, resources, name, lambda d, t: None, **options)  # type: ignore[arg-type]
        assert report.new_generation == 2


async def test_an_event_committed_behind_an_older_open_transaction_is_replayed(
    pool: asyncpg.Pool, resources: Resources, sessions: list[asyncpg.Connection]
) -> None:
    ta, tb, tc = sessions  # xids in this order
    late_xid, early_xid = str(uuid.uuid4()), str(uuid.uuid4())
    c = await append_one(tc, late_xid)
    await tc.execute("COMMIT")
    a = await append_one(ta, early_xid)
    await ta.execute("COMMIT")
    assert c.position < a.position
    # tb stays open (it claimed its xid between ta's and tc's, and wrote nothing yet).
    await _rebuild_both(resources)
    for order_id in (late_xid, early_xid):
        assert await _in_new_generation(pool, resources, order_id), order_id
    await tb.execute("ROLLBACK")


async def test_a_rebuild_waits_for_a_transaction_holding_a_lower_position(
    pool: asyncpg.Pool,
    resources: Resources,
    sessions: list[asyncpg.Connection],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.rebuild")
    ta, tb, tc = sessions
    ids = {name: str(uuid.uuid4()) for name in ("a", "b", "c")}
    b = await append_one(tb, ids["b"])  # the lowest position, still uncommitted
    c = await append_one(tc, ids["c"])
    await tc.execute("COMMIT")
    a = await append_one(ta, ids["a"])
    await ta.execute("COMMIT")
    assert b.position < c.position < a.position
    task = asyncio.create_task(_rebuild_both(resources))

    async def waiting() -> bool:
        return task.done() or any("waiting for" in r.getMessage() for r in caplog.records)

    await until(waiting, "the rebuild to wait for the open transaction")
    await tb.execute("COMMIT")
    await asyncio.wait_for(task, timeout=60)
    for order_id in ids.values():
        assert await _in_new_generation(pool, resources, order_id), order_id


async def test_a_transaction_that_stays_open_does_not_hold_the_rebuild_for_ever(
    pool: asyncpg.Pool, resources: Resources, sessions: list[asyncpg.Connection]
) -> None:
    ta, tb, tc = sessions
    ids = {name: str(uuid.uuid4()) for name in ("a", "c")}
    await append_one(tb, str(uuid.uuid4()))  # never commits during the rebuild
    await append_one(tc, ids["c"])
    await tc.execute("COMMIT")
    await append_one(ta, ids["a"])
    await ta.execute("COMMIT")
    # The settling wait gives up and the fenced phase replays everything committed.
    await asyncio.wait_for(_rebuild_both(resources, settle_timeout_s=0.5), timeout=60)
    for order_id in ids.values():
        assert await _in_new_generation(pool, resources, order_id), order_id
    await tb.execute("ROLLBACK")
