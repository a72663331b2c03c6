"""One order followed by its correlation id: from the HTTP request, through its events, into
the daemon's JSON log lines (with projection, partition and offset).

The real relay, daemon and API run with their output in files (not a terminal,
so JSON lines); the daemon at debug level, where it logs every event it applies.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from engine import Resources, Settings
from engine.correlation import HEADER
from projections.orders import APP
from tests.helpers import free_port, logged_engine, settings_env

pytestmark = pytest.mark.timeout(120)


def _lines(log: Path) -> list[dict[str, object]]:
    """Every line of ``log`` as JSON: a line that is not JSON fails the test."""
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines() if line]


async def _until_logged(log: Path, wanted: int, correlation: str, timeout_s: float = 60) -> list:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = [line for line in _lines(log) if line.get("correlation_id") == correlation]
        if len({line.get("projection") for line in found}) >= wanted:
            return found
        assert loop.time() < deadline, f"{wanted} projections never logged {correlation}: {found}"
        await asyncio.sleep(0.2)


async def test_an_orders_correlation_id_reaches_its_events_and_the_daemons_log_lines(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources, tmp_path: Path
) -> None:
    port = free_port()
    env = {**settings_env(settings_for_test), "ENGINE_API__PORT": str(port)}
    env.pop("ENGINE_OPS__LOG_FORMAT", None)  # auto: JSON, since the output is a file
    handling = [p.name for p, _ in APP.projections(resources) if "OrderCreated" in p.handles]
    correlation = str(uuid.uuid4())
    logs = {part: tmp_path / f"{part}.log" for part in ("relay", "run", "api")}
    async with (
        logged_engine("relay", env, logs["relay"]),
        logged_engine("run", env, logs["run"], "--log-level", "debug"),
        logged_engine("api", env, logs["api"]),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        for _ in range(100):
            try:
                await client.get("/health")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.2)
        customer = await client.post(
            "/customers", json={"name": "Ada", "email": f"{uuid.uuid4().hex[:8]}@ex.com"}
        )
        product = await client.post("/products", json={"name": "Engine", "price": "9.5"})
        # Without the header the API makes one, and says which.
        made = customer.headers[HEADER]
        assert uuid.UUID(made) and made != product.headers[HEADER]
        order = await client.post(
            "/orders",
            headers={HEADER: correlation},
            json={
                "customer_id": customer.json()["aggregate_id"],
                "items": [{"product_id": product.json()["aggregate_id"], "quantity": 1}],
                "shipping_address": {
                    "street": "1 Way",
                    "city": "London",
                    "postal_code": "N1",
                    "country": "UK",
                },
            },
        )
        assert order.status_code == 201, order.text
        assert order.headers[HEADER] == correlation
        order_id = order.json()["aggregate_id"]

        # Its events carry it ...
        stored = await pool.fetch(
            "SELECT correlation_id::text FROM engine_event_log WHERE aggregate_id = $1", order_id
        )
        assert [r["correlation_id"] for r in stored] == [correlation]
        # ... and so does every daemon line about them, one per projection that applied it.
        applied = await _until_logged(logs["run"], len(handling), correlation)
    for line in applied:
        assert line["aggregate_id"] == order_id and line["event_type"] == "OrderCreated"
        assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
    assert {line["projection"] for line in applied} == set(handling)
    # The API's line about the command names it too; every line of every log is JSON.
    commands = [line for line in _lines(logs["api"]) if line.get("command") == "CreateOrder"]
    assert [(c["correlation_id"], c["outcome"]) for c in commands] == [(correlation, "accepted")]
    assert _lines(logs["relay"]), "the relay logged nothing"
