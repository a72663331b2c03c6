"""`engine status` says per projection whether it is attached, detached or stalled, and why.

A real daemon records its lanes' state; status combines the rows of live
daemons with the lag it measures. Elasticsearch is frozen (SIGSTOP) to detach
the search lane alone; a daemon process is killed (SIGKILL) to leave rows that
nobody renews.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.lane_state import LaneState
from engine.status import ProjectionStatus, collect_status
from projections.orders import APP, ConfirmOrder
from tests.helpers import (
    new_customer,
    new_order,
    new_product,
    run_engine,
    settings_env,
    start_engine,
)
from tests.integration.read.expected import eventually
from tests.integration.read.faults import (
    failures_of,
    fast_detaching,
    frozen_elasticsearch,
    wait_for,
)
from tests.integration.read.scenario import populate

# Rows go stale after three of these: a killed daemon is noticed within 1.5 s.
INTERVAL_S = 0.5
SEARCH = "order_search"


def _reporting(settings: Settings) -> Settings:
    """Lane states recorded every INTERVAL_S; no stall by progress within a test's length."""
    runner = settings.runner.model_copy(
        update={"state_interval_s": INTERVAL_S, "stalled_after_s": 600.0}
    )
    return settings.model_copy(update={"runner": runner})


async def _status(settings: Settings, resources: Resources) -> dict[str, ProjectionStatus]:
    status = await collect_status(settings, APP, resources)
    return {p.name: p for p in status.projections}


async def _all_attached_and_caught_up(settings: Settings, resources: Resources) -> None:
    status = await _status(settings, resources)
    assert {name: (p.state, p.state_reason, p.lag_events) for name, p in status.items()} == (
        dict.fromkeys(status, (LaneState.ATTACHED, None, 0))
    )
    assert all(p.healthy for p in status.values())


async def _daemons(pool: asyncpg.Pool) -> set[str]:
    return {r["daemon"] for r in await pool.fetch("SELECT daemon FROM engine_lane_states")}


async def test_a_running_caught_up_daemon_shows_every_projection_attached_and_forgets_on_stop(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = _reporting(settings_for_test)
    await populate(bus, orders=3, seed=41)
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await eventually(lambda: _all_attached_and_caught_up(settings, resources), timeout_s=60)
        assert len(await _daemons(pool)) == 1
        rows = await pool.fetch("SELECT projection, partitions FROM engine_lane_states")
        assert {r["projection"] for r in rows} == {lane.name for lane in runner.lanes}
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)

    async def forgotten() -> None:
        assert await _daemons(pool) == set()

    # A clean stop deletes the daemon's rows: nobody is running the projections now.
    await eventually(forgotten, timeout_s=10)
    status = await _status(settings, resources)
    assert {p.state for p in status.values()} == {LaneState.NO_DAEMON}
    assert all(p.healthy for p in status.values())  # no daemon, nothing waiting: no failure


@pytest.mark.timeout(180)
async def test_a_frozen_search_store_shows_search_detached_with_a_reason_the_others_attached(
    bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    settings = _reporting(fast_detaching(settings_for_test))
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    runner = build_runner(
        APP, Resources(settings, resources.pool, resources.redis, resources.elasticsearch)
    )
    search = next(lane for lane in runner.lanes if lane.name == SEARCH)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
    try:
        await populate(bus, orders=3, seed=42)
        customer, product = await new_customer(bus), await new_product(bus)
        await eventually(lambda: _all_attached_and_caught_up(settings, resources), timeout_s=60)

        async with frozen_elasticsearch(settings):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not search.detached:  # load until the queue fills behind the frozen store
                assert loop.time() < deadline, "search was never detached"
                created = await new_order(bus, customer, [(product, 1)])
                await bus.execute(ConfirmOrder(order_id=uuid.UUID(created.aggregate_id)))

            async def search_detached_others_attached() -> None:
                status = await _status(settings, resources)
                frozen = status.pop(SEARCH)
                assert frozen.state is LaneState.DETACHED, frozen
                assert frozen.state_reason and not frozen.healthy
                assert {p.state for p in status.values()} == {LaneState.ATTACHED}

            await eventually(search_detached_others_attached, timeout_s=30)

        await wait_for(lambda: not search.detached, "search to re-attach", timeout_s=90)
        await eventually(lambda: _all_attached_and_caught_up(settings, resources), timeout_s=60)
    finally:
        stop.set()
        failures = await failures_of(tasks)
    assert not failures, failures


@pytest.mark.timeout(180)
async def test_a_killed_daemon_with_events_pending_shows_stalled_naming_the_daemon(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    settings = _reporting(settings_for_test)
    env = {**settings_env(settings), "ENGINE_RUNNER__STATE_INTERVAL_S": str(INTERVAL_S)}
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    await populate(bus, orders=6, seed=43)
    await relay.drain()
    daemon = await start_engine("run", "--log-level", "warning", env=env)
    try:
        await eventually(lambda: _all_attached_and_caught_up(settings, resources), timeout_s=90)
    finally:
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait()
    (killed,) = await _daemons(pool)
    assert f":{daemon.pid}:" in killed  # host:pid:random

    await populate(bus, orders=2, seed=44)
    await relay.drain()

    async def stalled() -> None:
        status = await _status(settings, resources)
        for p in status.values():
            assert p.state is LaneState.STALLED and not p.healthy, p
            assert p.state_reason and f"no report from daemon {killed}" in p.state_reason

    await eventually(stalled, timeout_s=30)

    code, out, err = await run_engine("status", "--json", env=env)
    assert code == 1, err
    shown = {p["name"]: (p["state"], p["state_reason"]) for p in json.loads(out)["projections"]}
    assert {state for state, _reason in shown.values()} == {"stalled"}
    assert all(killed in reason for _state, reason in shown.values())
    assert "needs attention" in err
