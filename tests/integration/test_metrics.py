"""/metrics of a real relay, daemon and API while commands flow: the figures move as they should.

Every process is the real `engine` command with this test's settings. Commands
go through the API; counts scraped from each process are compared with what
was sent and with what the engine recorded (the checkpoints' applied counts,
the event log). Elasticsearch is frozen (SIGSTOP) to see a projection's lag go
up on the daemon's /metrics and its /health/ready fail naming the projection
once it is stalled, and both clear once it is resumed. With
``--workers 2`` the counts are every worker's, summed, whichever process answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import Resources, Settings
from engine.postgres.checkpoints import CheckpointStore
from projections.orders import APP
from tests.helpers import child_pids, free_port, logged_engine, run_engine, settings_env
from tests.integration.read.faults import frozen_elasticsearch, wait_for

pytestmark = pytest.mark.timeout(150)

Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _env(settings: Settings) -> dict[str, str]:
    return {
        **settings_env(settings),
        "ENGINE_OPS__STATUS_INTERVAL_S": "0.5",
        "ENGINE_RUNNER__STATE_INTERVAL_S": "0.5",
        "ENGINE_RUNNER__SHUTDOWN_TIMEOUT_S": "10",
        "ENGINE_API__GRACEFUL_SHUTDOWN_S": "2",
    }


async def _scrape(client: httpx.AsyncClient, url: str) -> Figures:
    response = await client.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _sum(figures: Figures, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in figures.items() if n == name and wanted <= set(ls))


async def _until(
    client: httpx.AsyncClient, url: str, check: str, condition: object, timeout_s: float = 60
) -> Figures:
    """Scrape ``url`` until ``condition(figures)`` holds; fail naming ``check``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    figures: Figures = {}
    while loop.time() < deadline:
        with contextlib.suppress(httpx.TransportError):
            figures = await _scrape(client, url)
            if condition(figures):  # type: ignore[operator]
                return figures
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {check}; last scrape of {url}: {figures}")


async def _get_ok(client: httpx.AsyncClient, url: str, timeout_s: float = 60) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: object = None
    while loop.time() < deadline:
        try:
            response = await client.get(url, timeout=5)
            if response.status_code == 200:
                return response
            last = (response.status_code, response.text)
        except httpx.TransportError as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never answered 200: {last}")


@contextlib.asynccontextmanager
async def _engine(
    tmp_path: Path, command: str, env: dict[str, str], workers: int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``engine COMMAND [--workers N]``, its log in tmp_path; it must stop cleanly on SIGTERM."""
    log = tmp_path / f"{command}.log"
    options = [] if workers is None else ["--workers", str(workers)]
    async with logged_engine(command, env, log, *options) as process:
        yield process
    assert process.returncode == 0, log.read_text(errors="replace")[-3000:]


async def _send_orders(client: httpx.AsyncClient, orders: int) -> dict[str, int]:
    """A customer, a product and ``orders`` orders, each confirmed: the commands sent, by type."""
    customer = await client.post(
        "/customers", json={"name": "Ada Lovelace", "email": f"{uuid.uuid4().hex[:8]}@ex.com"}
    )
    assert customer.status_code == 201, customer.text
    product = await client.post("/products", json={"name": "Difference Engine", "price": "9.5"})
    assert product.status_code == 201, product.text
    for _ in range(orders):
        created = await client.post(
            "/orders",
            json={
                "customer_id": customer.json()["aggregate_id"],
                "items": [{"product_id": product.json()["aggregate_id"], "quantity": 2}],
                "shipping_address": {
                    "street": "1 Analytical Way",
                    "city": "London",
                    "postal_code": "N1 9GU",
                    "country": "UK",
                },
            },
        )
        assert created.status_code == 201, created.text
        confirmed = await client.post(f"/orders/{created.json()['aggregate_id']}/confirm")
        assert confirmed.status_code == 200, confirmed.text
    return {
        "RegisterCustomer": 1,
        "RegisterProduct": 1,
        "CreateOrder": orders,
        "ConfirmOrder": orders,
    }


async def _applied(pool: asyncpg.Pool) -> dict[str, int]:
    return {c.projection: c.applied for c in await CheckpointStore(pool).all()}


async def _all_applied(
    pool: asyncpg.Pool, names: list[str], timeout_s: float = 60
) -> dict[str, int]:
    """Wait until every projection's checkpoint reached the last event; their applied counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        last = await pool.fetchval("SELECT max(position) FROM engine_event_log")
        reached = {c.projection: c.last_position for c in await CheckpointStore(pool).all()}
        if all(reached.get(n, 0) >= last for n in names):
            return await _applied(pool)
        assert loop.time() < deadline, f"projections never reached {last}: {reached}"
        await asyncio.sleep(0.1)


def _projection_names(resources: Resources) -> list[str]:
    return [projection.name for projection, _ in APP.projections(resources)]


async def _until_ready(
    client: httpx.AsyncClient, url: str, code: int, naming: str | None = None
) -> None:
    """Until ``url`` answers ``code`` (and names ``naming`` among its problems)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    body: object = None
    while loop.time() < deadline:
        answer = await client.get(url, timeout=10)
        body = answer.json()
        named = naming is None or naming in {p["component"] for p in answer.json()["problems"]}
        if answer.status_code == code and named:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never answered {code} naming {naming}: {body}")


async def test_relay_daemon_and_api_metrics_move_with_the_commands_and_the_lag(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources, tmp_path: Path
) -> None:
    api_port, relay_port, daemon_port = free_port(), free_port(), free_port()
    env = {
        **_env(settings_for_test),
        "ENGINE_API__PORT": str(api_port),
        "ENGINE_RELAY__METRICS_PORT": str(relay_port),
        "ENGINE_RUNNER__METRICS_PORT": str(daemon_port),
        # Search, detached behind the frozen store below, is stalled after this long.
        "ENGINE_RUNNER__STALLED_AFTER_S": "3",
    }
    api, relay, daemon = (
        f"http://127.0.0.1:{api_port}",
        f"http://127.0.0.1:{relay_port}",
        f"http://127.0.0.1:{daemon_port}",
    )
    names = _projection_names(resources)
    async with (
        _engine(tmp_path, "relay", env),
        _engine(tmp_path, "run", env),
        _engine(tmp_path, "api", env),
        httpx.AsyncClient(base_url=api, timeout=10) as client,
    ):
        for url in (f"{relay}/health/live", f"{daemon}/health/live", f"{api}/health"):
            await _get_ok(client, url)
        ready = await _get_ok(client, f"{daemon}/health/ready")
        assert ready.json()["status"] == "ready"
        assert (await _get_ok(client, f"{relay}/health/ready")).json()["status"] == "ready"

        sent = await _send_orders(client, orders=5)
        refused = await client.post(f"/orders/{uuid.uuid4()}/ship", json={"tracking_number": "T"})
        assert refused.status_code == 404, refused.text
        events = await pool.fetchval("SELECT count(*) FROM engine_event_log")
        assert events == sum(sent.values())

        # The relay: every event published and its commit-to-ack time observed once.
        figures = await _until(
            client,
            f"{relay}/metrics",
            "the relay to publish every event",
            lambda f: _sum(f, "engine_relay_published_total") == events,
        )
        assert _sum(figures, "engine_relay_commit_to_ack_seconds_count") == events
        # The daemon: per projection, what it applied is what the checkpoints say.
        applied = await _all_applied(pool, names)
        figures = await _until(
            client,
            f"{daemon}/metrics",
            "applied counts equal to the checkpoints', and no lag",
            lambda f: (
                _sum(f, "engine_projection_lag_events") == 0
                and all(
                    _sum(f, "engine_events_applied_total", projection=n) == applied[n]
                    for n in names
                )
            ),
        )
        for name in names:
            assert _sum(figures, "engine_events_applied_total", projection=name) == applied[name]
            assert _sum(figures, "engine_batch_apply_duration_seconds_count", projection=name) > 0
        assert _sum(figures, "engine_status_sample_ok") == 1
        assert (
            _sum(figures, "engine_projection_state", projection="order_search", state="attached")
            == 1
        )
        # The API: every command and request counted, by type and outcome, by route template.
        figures = await _scrape(client, "/metrics")
        for command, count in sent.items():
            assert (
                _sum(figures, "engine_commands_total", command=command, outcome="accepted") == count
            )
        assert _sum(figures, "engine_commands_total", command="ShipOrder", outcome="rejected") == 1
        assert _sum(figures, "engine_command_duration_seconds_count", command="CreateOrder") == 5
        posts = {"route": "/orders/{order_id}/confirm", "method": "POST", "status": "200"}
        assert _sum(figures, "engine_http_requests_total", **posts) == 5
        assert _sum(figures, "engine_http_requests_total", route="/orders", status="201") == 5
        ship = {"route": "/orders/{order_id}/ship", "status": "404"}
        assert _sum(figures, "engine_http_requests_total", **ship) == 1

        # A frozen store: its projection's lag shows on the daemon; it goes back to 0 after.
        async with frozen_elasticsearch(settings_for_test):
            await _send_orders(client, orders=3)
            await _until(
                client,
                f"{daemon}/metrics",
                "order_search's lag to show",
                lambda f: _sum(f, "engine_projection_lag_events", projection="order_search") > 0,
            )
            # Detached longer than stalled_after_s: the daemon's readiness names it.
            await _until_ready(client, f"{daemon}/health/ready", 503, "order_search")
        figures = await _until(
            client,
            f"{daemon}/metrics",
            "order_search's lag back to 0",
            lambda f: (
                _sum(f, "engine_projection_lag_events", projection="order_search") == 0
                and _sum(f, "engine_projection_lag_seconds", projection="order_search") == 0
            ),
            timeout_s=90,
        )
        assert _sum(figures, "engine_projection_stalled", projection="order_search") == 0
        await _until_ready(client, f"{daemon}/health/ready", 200)
        relay_figures = await _scrape(client, f"{relay}/metrics")
    assert "engine_projection_lag_events" not in {n for n, _ in relay_figures}
    assert _sum(relay_figures, "engine_outbox_backlog_events") == 0


async def test_with_two_workers_the_counts_are_summed_whichever_process_answers(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources, tmp_path: Path
) -> None:
    api_port, relay_port, daemon_port = free_port(), free_port(), free_port()
    env = {
        **_env(settings_for_test),
        "ENGINE_API__PORT": str(api_port),
        "ENGINE_RELAY__METRICS_PORT": str(relay_port),
        "ENGINE_RUNNER__METRICS_PORT": str(daemon_port),
    }
    api, daemon = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{daemon_port}"
    names = _projection_names(resources)
    async with (
        _engine(tmp_path, "relay", env),
        _engine(tmp_path, "run", env, workers=2) as daemons,
        _engine(tmp_path, "api", env, workers=2) as server,
    ):
        async with httpx.AsyncClient(base_url=api, timeout=10) as client:
            await _get_ok(client, "/health")
            await _get_ok(client, f"{daemon}/health/live")
            before = await _scrape(client, "/metrics")
        await wait_for(lambda: len(child_pids(server.pid)) == 2, "two API workers", 30)
        await wait_for(lambda: len(child_pids(daemons.pid)) == 2, "two daemon workers", 30)
        first, second = sorted(child_pids(server.pid))
        health = {"route": "/health", "method": "GET", "status": "200"}
        accepted = {"command": "CreateOrder", "outcome": "accepted"}
        expected = _sum(before, "engine_http_requests_total", **health)
        # Each worker alone (the other stopped) answers some requests, then the scrape:
        # new connections only reach the one that accepts.
        for stopped, requests, orders in ((second, 3, 1), (first, 4, 2)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                async with httpx.AsyncClient(base_url=api, timeout=10) as client:
                    for _ in range(requests):
                        assert (await client.get("/health")).status_code == 200
                    await _send_orders(client, orders=1)
                    figures = await _scrape(client, "/metrics")
            finally:
                os.kill(stopped, signal.SIGCONT)
            expected += requests
            assert _sum(figures, "engine_http_requests_total", **health) == expected
            assert _sum(figures, "engine_commands_total", **accepted) == orders

        # The daemon's supervisor sums its workers' applied counts.
        applied = await _all_applied(pool, names)
        async with httpx.AsyncClient(timeout=10) as client:
            figures = await _until(
                client,
                f"{daemon}/metrics",
                "the workers' applied counts, summed, equal to the checkpoints'",
                lambda f: all(
                    _sum(f, "engine_events_applied_total", projection=n) == applied[n]
                    for n in names
                ),
            )
            assert (await _get_ok(client, f"{daemon}/health/ready")).json()["status"] == "ready"
        assert all(applied[n] > 0 for n in names)
        assert _sum(figures, "engine_status_sample_ok") == 1


@pytest.mark.parametrize("command", ["run", "relay"])
async def test_a_taken_metrics_port_exits_4_naming_the_address(
    command: str, settings_for_test: Settings
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_engine(
            command, "--metrics-port", str(port), env=settings_env(settings_for_test)
        )
    assert code == 4, err
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(err.split())


async def test_a_daemon_waiting_for_its_services_is_live_not_ready_and_stops_cleanly(
    settings_for_test: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **_env(settings_for_test),
        "ENGINE_POSTGRES__PORT": str(free_port()),  # nothing listens: it waits
        "ENGINE_RUNNER__METRICS_PORT": str(port),
    }
    ops = f"http://127.0.0.1:{port}"
    async with _engine(tmp_path, "run", env), httpx.AsyncClient(timeout=10) as client:
        await _get_ok(client, f"{ops}/health/live")
        ready = await client.get(f"{ops}/health/ready")
        assert ready.status_code == 503
        assert ready.json()["problems"] == [{"component": "daemon", "reason": "starting"}]
        figures = await _scrape(client, f"{ops}/metrics")
        assert _sum(figures, "engine_status_sample_ok") == 0
        assert (await client.get(f"{ops}/nowhere")).status_code == 404
        assert (await client.post(f"{ops}/metrics")).status_code == 405
