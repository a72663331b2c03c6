"""A stalled projection or relay is reported, fails readiness and `engine status`, and clears.

The stall is made, not simulated: Elasticsearch frozen (SIGSTOP) while commands
flow detaches the search lane; a projection table locked by a transaction held
open hangs a Postgres lane; a running `engine relay` process frozen (SIGSTOP)
stops publishing. With ``stalled_after_s`` a few seconds, status must then say
STALLED naming the projection (or the relay) and why, `engine status` exit 1,
and the API's ``/health/ready`` answer 503 naming it; after SIGCONT (or the
lock released) all of it clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.daemon import build_runner
from engine.lane_state import LaneState
from engine.status import EngineStatus, collect_status
from projections.orders import APP, ConfirmOrder
from tests.helpers import (
    free_port,
    new_customer,
    new_order,
    new_product,
    run_engine,
    settings_env,
    start_engine,
    supervised_engine,
)
from tests.integration.read.expected import eventually
from tests.integration.read.faults import (
    failures_of,
    fast_detaching,
    frozen_elasticsearch,
    wait_for,
)

STALL_S = 3.0
INTERVAL_S = 0.5
SEARCH = "order_search"
DETAILS = "order_details"


def _stalling(settings: Settings, *, projections_stall_s: float = STALL_S) -> Settings:
    """Stalls after STALL_S; lane states and the API's status sample every INTERVAL_S."""
    settings = fast_detaching(settings)
    runner = settings.runner.model_copy(
        update={"state_interval_s": INTERVAL_S, "stalled_after_s": projections_stall_s}
    )
    relay = settings.relay.model_copy(update={"stalled_after_s": STALL_S})
    ops = settings.ops.model_copy(update={"status_interval_s": INTERVAL_S})
    return settings.model_copy(update={"runner": runner, "relay": relay, "ops": ops})


def _env(settings: Settings, port: int) -> dict[str, str]:
    return {
        **settings_env(settings),
        "ENGINE_RUNNER__STATE_INTERVAL_S": str(settings.runner.state_interval_s),
        "ENGINE_RUNNER__STALLED_AFTER_S": str(settings.runner.stalled_after_s),
        "ENGINE_RELAY__STALLED_AFTER_S": str(settings.relay.stalled_after_s),
        "ENGINE_OPS__STATUS_INTERVAL_S": str(settings.ops.status_interval_s),
        "ENGINE_API__PORT": str(port),
    }


@contextlib.asynccontextmanager
async def _api(env: dict[str, str], log: Path) -> AsyncIterator[httpx.AsyncClient]:
    """`engine api` in a subprocess, and a client for it once it answers."""
    async with (
        supervised_engine("api", 1, env, log),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['ENGINE_API__PORT']}") as client,
    ):

        async def live() -> None:
            assert (await client.get("/health/live", timeout=2)).status_code == 200

        await eventually(live, timeout_s=60)
        yield client


async def _ready(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    answer = await client.get("/health/ready", timeout=10)
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


async def _gauge(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """One gauge of the API's /metrics (the status gauges of its own sample)."""
    text = (await client.get("/metrics", timeout=10)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in /metrics")


async def _is_ready(client: httpx.AsyncClient) -> None:
    code, body = await _ready(client)
    assert code == 200 and body["status"] == "ready" and body["problems"] == [], body


def _ours(settings: Settings, resources: Resources) -> Resources:
    """The test's connections, with the test's settings (the daemon reads them from here)."""
    return Resources(settings, resources.pool, resources.redis, resources.elasticsearch)


def _collect(settings: Settings, resources: Resources) -> Callable[[], Awaitable[EngineStatus]]:
    return lambda: collect_status(settings, APP, resources)


async def _only_stalled(status: Callable[[], Awaitable[EngineStatus]], name: str) -> None:
    """``name`` alone is stalled, for the time it has been detached; so not healthy."""
    now = await status()
    shown = {p.name: p for p in now.projections}
    stuck = shown.pop(name)
    assert stuck.state is LaneState.STALLED, stuck
    assert stuck.state_reason and "detached for" in stuck.state_reason, stuck.state_reason
    assert not stuck.healthy and not now.healthy
    assert LaneState.STALLED not in {p.state for p in shown.values()}, shown


async def _not_ready_for(api: httpx.AsyncClient, name: str) -> None:
    """/health/ready answers 503 naming ``name`` alone, detached too long."""
    code, body = await _ready(api)
    assert code == 503 and body["status"] == "not ready", body
    (problem,) = body["problems"]
    assert problem["component"] == name, body
    assert "detached for" in problem["reason"], body


@contextlib.asynccontextmanager
async def _flowing(bus: CommandBus) -> AsyncIterator[None]:
    """Orders created and confirmed in the background inside the block."""
    customer, product = await new_customer(bus), await new_product(bus)

    async def flow() -> None:
        while True:
            created = await new_order(bus, customer, [(product, 1)])
            await bus.execute(ConfirmOrder(order_id=uuid.UUID(created.aggregate_id)))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(flow())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.timeout(120)
async def test_search_detached_behind_frozen_elasticsearch_through_a_rebalance_stalls_then_clears(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    tmp_path: Path,
) -> None:
    """Issue 14's report: search stuck after a rebalance during an Elasticsearch outage."""
    settings = _stalling(settings_for_test)
    env = _env(settings, free_port())
    status = _collect(settings, resources)
    runner = build_runner(APP, _ours(settings, resources))
    search = next(lane for lane in runner.lanes if lane.name == SEARCH)
    stop = asyncio.Event()
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
    try:
        async with _api(env, tmp_path / "api.log") as api:
            await eventually(lambda: _is_ready(api), timeout_s=60)
            async with _flowing(bus), frozen_elasticsearch(settings):
                await wait_for(lambda: search.detached, "search to detach", 30)
                # A second daemon joins the group: the partitions are shared out again,
                # the first daemon's catch-up restarts, the newcomer's search lane hangs.
                joiner = build_runner(APP, _ours(settings, resources))
                tasks.append(asyncio.create_task(joiner.run(stop)))

                async def two_daemons_report_search() -> None:
                    daemons = await pool.fetchval(
                        "SELECT count(*) FROM engine_lane_states WHERE projection = $1", SEARCH
                    )
                    assert daemons == 2
                    assert any(lane.next_offset for lane in joiner.lanes)  # rebalanced

                await eventually(two_daemons_report_search, timeout_s=30)
                await eventually(lambda: _only_stalled(status, SEARCH), timeout_s=30)
                await eventually(lambda: _not_ready_for(api, SEARCH), timeout_s=10)
                assert await _gauge(api, "engine_projection_stalled", projection=SEARCH) == 1
                assert await _gauge(api, "engine_projection_stalled", projection=DETAILS) == 0
                code, out, err = await run_engine("status", "--json", env=env)
                assert code == 1, err
                shown = {p["name"]: p for p in json.loads(out)["projections"]}
                assert shown[SEARCH]["state"] == "stalled", shown[SEARCH]
                assert "detached for" in shown[SEARCH]["state_reason"]
                assert f"needs attention: {SEARCH}" in err

            # Resumed, no more load: search catches up, re-attaches, and it all clears.
            async def cleared() -> None:
                now = await status()
                assert now.healthy, [(p.name, p.state, p.state_reason) for p in now.projections]
                await _is_ready(api)
                assert await _gauge(api, "engine_projection_stalled", projection=SEARCH) == 0

            await eventually(cleared, timeout_s=90)
    finally:
        stop.set()
        failures = await failures_of(tasks)
    assert not failures, failures


@pytest.mark.timeout(90)
async def test_a_postgres_lane_hung_on_a_lock_stalls_naming_it_then_clears(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
) -> None:
    """Another store, another hang: a transaction holds the view's table locked."""
    settings = _stalling(settings_for_test)
    status = _collect(settings, resources)
    runner = build_runner(APP, _ours(settings, resources))
    details = next(lane for lane in runner.lanes if lane.name == DETAILS)
    stop = asyncio.Event()
    relay = OutboxRelay(settings.postgres, settings.kafka, settings.relay)
    tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(relay.run(stop))]
    try:
        async with _flowing(bus):
            await asyncio.sleep(1.0)  # the lane set up its table
            table = await pool.fetchval(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE $1 || '%'", DETAILS
            )
            assert table, "order_details has no table yet"
            async with pool.acquire() as locker, locker.transaction():
                await locker.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
                await wait_for(lambda: details.detached, "order_details to detach", 30)
                await eventually(lambda: _only_stalled(status, DETAILS), timeout_s=30)

        async def cleared() -> None:
            assert (await status()).healthy

        await eventually(cleared, timeout_s=60)
    finally:
        stop.set()
        failures = await failures_of(tasks)
    assert not failures, failures


@pytest.mark.timeout(90)
async def test_a_frozen_relay_with_events_waiting_stalls_naming_its_lease_then_clears(
    bus: CommandBus, settings_for_test: Settings, resources: Resources, tmp_path: Path
) -> None:
    # No daemon here: the projections wait, reported "no daemon", not stalled, within the test.
    settings = _stalling(settings_for_test, projections_stall_s=600.0)
    env = _env(settings, free_port())
    status = _collect(settings, resources)
    relay = await start_engine("relay", "--log-level", "warning", env=env)
    try:
        async with _api(env, tmp_path / "api.log") as api:
            await new_customer(bus)

            async def published() -> None:
                assert (await status()).outbox.unpublished == 0
                await _is_ready(api)

            await eventually(published, timeout_s=60)
            os.kill(relay.pid, signal.SIGSTOP)
            try:
                async with _flowing(bus):

                    async def relay_stalled() -> None:
                        now = await status()
                        assert now.outbox.stalled and not now.healthy, now.outbox
                        reason = now.outbox.stalled_reason
                        assert reason and "nothing was published for" in reason
                        assert "the leader relay" in reason and "renewed its lease" in reason

                    await eventually(relay_stalled, timeout_s=30)

                    async def api_not_ready() -> None:
                        code, body = await _ready(api)
                        assert code == 503, body
                        assert [p["component"] for p in body["problems"]] == ["relay"], body

                    await eventually(api_not_ready, timeout_s=10)
                    assert await _gauge(api, "engine_relay_stalled") == 1
                    code, out, err = await run_engine("status", "--json", env=env)
                    assert code == 1, err
                    assert json.loads(out)["outbox"]["stalled"] is True
                    assert "the relay is stalled" in err
            finally:
                os.kill(relay.pid, signal.SIGCONT)

            async def cleared() -> None:
                now = await status()
                assert not now.outbox.stalled and now.outbox.unpublished == 0, now.outbox
                await _is_ready(api)
                assert await _gauge(api, "engine_relay_stalled") == 0

            await eventually(cleared, timeout_s=30)
    finally:
        relay.send_signal(signal.SIGTERM)
        await asyncio.wait_for(relay.wait(), timeout=30)
