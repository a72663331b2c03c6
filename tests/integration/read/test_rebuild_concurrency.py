"""Rebuilds are exclusive and crash-safe; every writer uses the one current generation.

Each test stops the rebuild at a chosen step by holding a lock it needs next
(the fence a lane holds, the generation row) and kills it there with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.codec import encode
from engine.daemon import build_runner
from engine.dlq import replay
from engine.events import EventEnvelope
from engine.generations import current_generation, fence_key
from engine.postgres.deadletters import DeadLetterStore
from engine.rebuild import rebuild
from engine.stores.redis import generation_pointer
from projections.orders import APP
from projections.orders.wiring import quick_lookup_prefix, search_alias
from tests.helpers import run_engine, settings_env, start_engine
from tests.integration.read.expected import assert_projections_match
from tests.integration.read.generation_kit import order_created, until, wait_for_fence_waiter
from tests.integration.read.scenario import populate

_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, 0))"
_LOCK_SHARED = "SELECT pg_advisory_lock_shared(hashtextextended($1, 0))"


async def _readers_on(resources: Resources, name: str) -> set[int]:
    """The generation(s) readers of ``name`` are pointed at (alias or pointer key)."""
    if name == "order_search":
        alias = search_alias(resources)
        try:
            indices = (await resources.elasticsearch.indices.get_alias(name=alias)).body
        except Exception:
            return set()
        return {int(index.rsplit("-v", 1)[1]) for index in indices}
    pointer = await resources.redis.get(generation_pointer(quick_lookup_prefix(resources)))
    return {int(pointer)} if pointer is not None else set()


async def _truth(pool: asyncpg.Pool, name: str) -> int:
    async with pool.acquire() as conn:
        return await current_generation(conn, name)


async def _daemon_catches_up(settings: Settings, resources: Resources) -> None:
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    await asyncio.wait_for(
        build_runner(APP, resources).run(asyncio.Event(), until_caught_up=True), timeout=90
    )


async def test_a_second_rebuild_of_the_same_projection_is_refused_naming_the_first(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=5, seed=41)
    await _daemon_catches_up(settings_for_test, resources)
    lane = await asyncpg.connect(settings_for_test.postgres.dsn())
    try:
        # A lane mid-batch: the first rebuild reaches its switch and waits there,
        # holding its rebuild lock.
        await lane.execute(_LOCK_SHARED, fence_key("order_search"))
        first = asyncio.create_task(rebuild(APP, resources, "order_search", lambda d, t: None))
        holder_pid = await wait_for_fence_waiter(pool, "order_search", "ExclusiveLock")

        code, _, err = await run_engine(
            "rebuild", "order_search", env=settings_env(settings_for_test), timeout_s=60
        )
        assert code == 1, err
        assert "already being rebuilt" in err, err
        assert f"pid {holder_pid}" in err and "engine rebuild order_search" in err, err

        await lane.execute("SELECT pg_advisory_unlock_all()")
        report = await asyncio.wait_for(first, timeout=60)
    finally:
        await lane.close()
    assert (report.old_generation, report.new_generation) == (1, 2)
    assert await _readers_on(resources, "order_search") == {2}
    await _daemon_catches_up(settings_for_test, resources)
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )


async def test_a_dead_letter_replayed_after_a_rebuild_lands_in_the_current_generation(
    pool: asyncpg.Pool, resources: Resources
) -> None:
    report = await rebuild(APP, resources, "order_details", lambda d, t: None)
    assert report.new_generation == 2
    order_id = str(uuid.uuid4())
    row = order_created(order_id, customer_name="Late Letter")
    envelope = EventEnvelope(
        event_id=row[0],
        event_type=row[1],
        schema_version=row[2],
        aggregate_type=row[3],
        aggregate_id=row[4],
        aggregate_version=row[5],
        position=1,
        occurred_at=row[6],
        correlation_id=row[7],
        causation_id=row[8],
        payload=json.loads(row[9]),
    )
    await pool.execute(
        'INSERT INTO engine_dead_letters (projection, topic, partition, "offset", value,'
        " headers, event_type, error, attempts) VALUES ('order_details', 't', 0, 5, $1, '{}',"
        " 'OrderCreated', 'ValueError: boom', 3)",
        encode(envelope).value,
    )
    (letter,) = await DeadLetterStore(pool).list()

    outcome = await replay(letter, APP, resources)

    assert outcome.ok, outcome.detail
    assert (
        await pool.fetchval("SELECT customer_name FROM order_details WHERE id = $1", order_id)
        == "Late Letter"
    )
    assert await pool.fetchval("SELECT to_regclass('order_details_g1')") is None


@pytest.mark.parametrize("name", ["order_search", "order_quick_lookup"])
async def test_a_rebuild_killed_before_its_switch_commits_leaves_readers_where_the_daemon_writes(
    name: str,
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
) -> None:
    await populate(bus, orders=5, seed=51)
    await _daemon_catches_up(settings_for_test, resources)
    await pool.execute(
        "INSERT INTO engine_projection_generations (projection, generation) VALUES ($1, 1)", name
    )
    holder = await asyncpg.connect(settings_for_test.postgres.dsn())
    process = None
    try:
        # The switch's record of the new generation waits for this row lock.
        await holder.execute("BEGIN")
        await holder.execute(
            "SELECT 1 FROM engine_projection_generations WHERE projection = $1 FOR UPDATE", name
        )
        process = await start_engine("rebuild", name, env=settings_env(settings_for_test))

        async def switch_waiting() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%INSERT INTO engine_projection_generations%'"
                )
            )

        await until(switch_waiting, "the rebuild's switch to wait for the generation row")
        process.kill()
        await process.wait()
        await holder.execute("ROLLBACK")
    finally:
        if process is not None and process.returncode is None:
            process.kill()
        await holder.close()
    assert await _truth(pool, name) == 1
    await _daemon_catches_up(settings_for_test, resources)  # a daemon starts
    assert await _readers_on(resources, name) == {1}, "readers left on an uncommitted generation"

    # The next rebuild cleans up the half-built generation 2 and completes.
    code, out, err = await run_engine("rebuild", name, env=settings_env(settings_for_test))
    assert code == 0, err
    assert "generation 1 -> 2" in out
    assert await _readers_on(resources, name) == {2}
    await populate(bus, orders=2, seed=52)
    await _daemon_catches_up(settings_for_test, resources)
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )


@pytest.mark.parametrize("name", ["order_search", "order_quick_lookup"])
async def test_a_rebuild_killed_after_its_switch_committed_is_repaired_by_the_daemon(
    name: str,
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
) -> None:
    await populate(bus, orders=5, seed=61)
    await _daemon_catches_up(settings_for_test, resources)
    key = fence_key(name)
    lane = await asyncpg.connect(settings_for_test.postgres.dsn())
    next_in_line = await asyncpg.connect(settings_for_test.postgres.dsn())
    process = None
    queued: asyncio.Task[object] | None = None
    try:
        # A lane mid-batch holds the fence: the switch queues for it exclusively.
        await lane.execute(_LOCK_SHARED, key)
        process = await start_engine("rebuild", name, env=settings_env(settings_for_test))
        await wait_for_fence_waiter(pool, name, "ExclusiveLock")
        # Queued behind the switch: granted the moment the switch commits, so the
        # rebuild's next step (pointing readers, under the shared fence) waits.
        queued = asyncio.create_task(next_in_line.execute(_LOCK, key))

        async def two_queued() -> bool:
            rows = await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND mode = 'ExclusiveLock'"
            )
            return bool(rows >= 2)

        await until(two_queued, "a second exclusive waiter behind the switch")
        await lane.execute("SELECT pg_advisory_unlock_all()")
        await asyncio.wait_for(queued, timeout=60)  # the switch committed
        await wait_for_fence_waiter(pool, name, "ShareLock")
        process.kill()  # after the commit, before the alias or pointer moved
        await process.wait()
        assert await _truth(pool, name) == 2
        assert await _readers_on(resources, name) == {1}  # behind: the crash window
        await next_in_line.execute("SELECT pg_advisory_unlock_all()")
    finally:
        if process is not None and process.returncode is None:
            process.kill()
        if queued is not None and not queued.done():
            queued.cancel()
            with contextlib.suppress(BaseException):
                await queued
        await lane.close()
        await next_in_line.close()

    await populate(bus, orders=2, seed=62)
    await _daemon_catches_up(settings_for_test, resources)  # a daemon starts: it repairs
    assert await _readers_on(resources, name) == {2}
    await assert_projections_match(
        settings_for_test, pool, resources.redis, resources.elasticsearch
    )
