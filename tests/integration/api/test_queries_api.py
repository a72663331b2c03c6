"""Query endpoints over the real projections, read-your-writes, and the read-only role."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from engine import CommandBus, Resources, Settings, create_pool
from projections.orders.wiring import quick_lookup_prefix
from tests.helpers import new_customer, new_order, new_product
from tests.integration.api.conftest import api_client, engine_running, project
from tests.integration.read.scenario import populate

ADDRESS = {"street": "9 Rue Lepic", "city": "Paris", "postal_code": "75018", "country": "FR"}


async def _get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def _orders_of_one_customer(bus: CommandBus, count: int) -> tuple[str, list[str]]:
    customer = await new_customer(bus, "Grace Hopper")
    product = await new_product(bus, "Compiler Manual", "12.50")
    orders = [
        (await new_order(bus, customer, [(product, 1 + i)])).aggregate_id for i in range(count)
    ]
    return customer, orders


async def test_order_details_and_quick_lookup(
    api: httpx.AsyncClient, bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    customer, (order,) = await _orders_of_one_customer(bus, 1)
    await project(settings_for_test, resources)

    details = await _get(api, f"/orders/{order}")
    assert details["order_id"] == order
    assert details["customer_id"] == customer
    assert details["customer_name"] == "Grace Hopper"
    assert (details["status"], details["version"], details["item_count"]) == ("PENDING", 1, 1)
    assert Decimal(details["total"]) == Decimal("12.50")
    assert details["items"][0]["product_name"] == "Compiler Manual"
    assert details["city"] == "London"

    quick = await _get(api, f"/orders/{order}/quick")
    assert quick["source"] == "redis"
    assert (quick["status"], quick["customer_id"], quick["version"]) == ("PENDING", customer, 1)
    assert Decimal(quick["total"]) == Decimal("12.50")

    # Redis lost the key: the answer comes from Postgres and says so.
    keys = [k async for k in resources.redis.scan_iter(match=f"{quick_lookup_prefix(resources)}*")]
    assert await resources.redis.delete(*[k for k in keys if k.endswith(order)]) == 1
    fallback = await _get(api, f"/orders/{order}/quick")
    assert fallback["source"] == "postgres"
    assert {k: v for k, v in fallback.items() if k != "source"} == {
        k: v for k, v in quick.items() if k != "source"
    }

    missing = await api.get(f"/orders/{uuid.uuid4()}/quick")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (await api.get(f"/orders/{uuid.uuid4()}")).status_code == 404


async def test_a_customers_orders_page_newest_first_with_a_cursor(
    api: httpx.AsyncClient, bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    customer, orders = await _orders_of_one_customer(bus, 5)
    await project(settings_for_test, resources)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = await _get(api, f"/customers/{customer}/orders", **params)
        seen += [item["order_id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(orders))  # newest first, each exactly once
    created = [
        datetime.fromisoformat(i["created_at"])
        for i in (await _get(api, f"/customers/{customer}/orders", limit=100))["items"]
    ]
    assert created == sorted(created, reverse=True)

    assert (
        await api.get(f"/customers/{customer}/orders", params={"limit": 101})
    ).status_code == 422
    bad = await api.get(f"/customers/{customer}/orders", params={"cursor": "not-a-cursor"})
    assert (bad.status_code, bad.json()["field"]) == (422, "cursor")
    nobody = await _get(api, f"/customers/{uuid.uuid4()}/orders")
    assert nobody == {"items": [], "next_cursor": None}


async def test_orders_by_status_and_statistics(
    api: httpx.AsyncClient,
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
) -> None:
    await populate(bus, orders=30)
    await project(settings_for_test, resources)
    by_status = {
        row["status"]: (row["n"], row["revenue"])
        for row in await pool.fetch(
            "SELECT status, count(*) AS n, sum(total) AS revenue FROM orders GROUP BY status"
        )
    }
    for status, (count, _) in by_status.items():
        page = await _get(api, "/orders", status=status, limit=100)
        assert len(page["items"]) == count
        assert {item["status"] for item in page["items"]} == {status}

    today = datetime.now(UTC).date().isoformat()
    stats = await _get(api, "/stats/orders", date_from=today, date_to=today)
    totals = {t["status"]: (t["orders"], Decimal(t["revenue"])) for t in stats["totals"]}
    assert totals == by_status
    backwards = await api.get("/stats/orders", params={"date_from": today, "date_to": "2000-01-01"})
    assert (backwards.status_code, backwards.json()["field"]) == (422, "date_to")


async def test_search_finds_by_text_and_filters_and_ignores_query_syntax(
    api: httpx.AsyncClient, bus: CommandBus, settings_for_test: Settings, resources: Resources
) -> None:
    await populate(bus, orders=20)
    customer = await new_customer(bus, "Margaret Hamilton")
    product = await new_product(bus, "Apollo Guidance Computer", "99.00")
    order = (await new_order(bus, customer, [(product, 2)])).aggregate_id
    await project(settings_for_test, resources)
    await resources.elasticsearch.indices.refresh(
        index=f"{settings_for_test.elasticsearch.index_prefix}-orders"
    )

    found = await _get(api, "/search/orders", text="hamilton apollo")
    assert [hit["order_id"] for hit in found["hits"]] == [order]
    assert found["total"] == 1
    pending = await _get(api, "/search/orders", text="Apollo", status="PENDING", min_total="100")
    assert pending["total"] == 1
    assert (await _get(api, "/search/orders", text="Apollo", max_total="100"))["total"] == 0
    everything = (await _get(api, "/search/orders", size=100))["total"]
    assert everything == 21
    for text in ("*", "status:PENDING OR *", 'Apollo" OR "', "(", "\\", "customer_name:*", "*:*"):
        answer = await api.get("/search/orders", params={"text": text})
        assert answer.status_code == 200, (text, answer.text)
        assert answer.json()["total"] < everything, text  # never widened to match all
    sorted_page = await _get(api, "/search/orders", sort="total", direction="asc", size=5, page=2)
    totals = [Decimal(hit["total"]) for hit in sorted_page["hits"]]
    assert totals == sorted(totals) and len(totals) == 5


async def test_read_your_writes_in_all_three_stores(
    api: httpx.AsyncClient, settings_for_test: Settings, resources: Resources
) -> None:
    async with engine_running(settings_for_test, resources):
        customer = await api.post(
            "/customers", json={"name": "Katherine Johnson", "email": "kj@example.com"}
        )
        product = await api.post("/products", json={"name": "Slide Rule", "price": "3.00"})
        created = await api.post(
            "/orders",
            json={
                "customer_id": customer.json()["aggregate_id"],
                "items": [{"product_id": product.json()["aggregate_id"], "quantity": 1}],
                "shipping_address": ADDRESS,
            },
        )
        order = created.json()["aggregate_id"]
        confirmed = (await api.post(f"/orders/{order}/confirm")).json()
        token = confirmed["consistency_token"]

        details = await _get(api, f"/orders/{order}", consistency_token=token)
        assert (details["status"], details["version"]) == ("CONFIRMED", 2)
        quick = await api.get(f"/orders/{order}/quick", headers={"X-Consistency-Token": token})
        assert (quick.json()["status"], quick.json()["source"]) == ("CONFIRMED", "redis")
        search = await _get(api, "/search/orders", text="Katherine", consistency_token=token)
        assert [(h["order_id"], h["status"]) for h in search["hits"]] == [(order, "CONFIRMED")]
        listing = await _get(
            api, f"/customers/{customer.json()['aggregate_id']}/orders", consistency_token=token
        )
        assert listing["items"][0]["status"] == "CONFIRMED"
        today = datetime.now(UTC).date().isoformat()
        stats = await _get(
            api, "/stats/orders", date_from=today, date_to=today, consistency_token=token
        )
        assert {t["status"] for t in stats["totals"]} == {"CONFIRMED"}


async def test_a_token_the_projection_has_not_reached_is_503_not_stale_data(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources, bus: CommandBus
) -> None:
    _, (order,) = await _orders_of_one_customer(bus, 1)
    await project(settings_for_test, resources)
    quick = settings_for_test.api.model_copy(update={"consistency_timeout_s": 0.3})
    async with api_client(settings_for_test.model_copy(update={"api": quick})) as api:
        # A write nobody projects (no relay, no daemon running now).
        token = (await api.post(f"/orders/{order}/confirm")).json()["consistency_token"]
        answer = await api.get(f"/orders/{order}", params={"consistency_token": token})
        assert answer.status_code == 503
        assert answer.json()["error"] == "not_yet_consistent"
        assert answer.json()["projection"] == "order_details"
        assert answer.headers["Retry-After"]
        # Without a token the (older) state is served as it is.
        assert (await _get(api, f"/orders/{order}"))["status"] == "PENDING"


async def test_the_query_side_role_cannot_write(
    settings_for_test: Settings, bus: CommandBus, resources: Resources
) -> None:
    await _orders_of_one_customer(bus, 1)
    await project(settings_for_test, resources)
    read = settings_for_test.read.resolve(settings_for_test.postgres)
    assert read.user != settings_for_test.postgres.user
    reader = await create_pool(read)
    try:
        assert await reader.fetchval("SELECT count(*) FROM order_details") == 1
        for statement in (
            "DELETE FROM order_details",
            "INSERT INTO engine_outbox (position) VALUES (1)",
            "UPDATE orders SET status = 'DELIVERED'",
            "CREATE TABLE sneaky (id int)",
        ):
            with pytest.raises(
                (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
            ):
                await reader.execute(statement)
    finally:
        await reader.close()


async def test_a_store_that_is_down_is_a_503_naming_it_and_the_rest_still_answers(
    settings_for_test: Settings, bus: CommandBus, resources: Resources
) -> None:
    _, (order,) = await _orders_of_one_customer(bus, 1)
    await project(settings_for_test, resources)
    closed = _closed_port()
    down = settings_for_test.model_copy(
        update={
            "redis": settings_for_test.redis.model_copy(update={"port": closed}),
            "elasticsearch": settings_for_test.elasticsearch.model_copy(
                update={"url": f"http://127.0.0.1:{closed}", "request_timeout_s": 2}
            ),
        }
    )
    async with api_client(down) as api:
        quick = await api.get(f"/orders/{order}/quick")
        assert quick.status_code == 503
        assert (quick.json()["error"], "Redis" in quick.json()["message"]) == (
            "service_unavailable",
            True,
        )
        search = await api.get("/search/orders", params={"text": "Grace"})
        assert search.status_code == 503
        assert "Elasticsearch" in search.json()["message"]
        assert search.headers["Retry-After"]
        # Postgres is up: its views still answer.
        assert (await _get(api, f"/orders/{order}"))["order_id"] == order


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: nothing listens there
