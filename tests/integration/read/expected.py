"""What every projection must contain, computed straight from the write model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
from elasticsearch import AsyncElasticsearch
from redis.asyncio import Redis

from engine import Settings


async def write_model_orders(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch(
        """
        SELECT o.*, c.name AS customer_name, c.email AS customer_email,
               (SELECT json_agg(json_build_object('product_name', i.product_name,
                        'quantity', i.quantity, 'unit_price', i.unit_price) ORDER BY i.line_no)
                FROM order_items i WHERE i.order_id = o.id) AS items
        FROM orders o JOIN customers c ON c.id = o.customer_id
        """
    )
    result = {}
    for row in rows:
        order = dict(row)
        order["items"] = json.loads(order["items"])
        order["item_count"] = sum(i["quantity"] for i in order["items"])
        result[str(row["id"])] = order
    return result


async def assert_projections_match(
    settings: Settings, pool: asyncpg.Pool, redis: Redis, es: AsyncElasticsearch
) -> int:
    """Compare every store with the write model, field by field. Returns the order count."""
    orders = await assert_postgres_and_redis_match(settings, pool, redis)
    await _check_search(settings, es, orders)
    return len(orders)


async def assert_postgres_and_redis_match(
    settings: Settings, pool: asyncpg.Pool, redis: Redis
) -> dict[str, dict[str, Any]]:
    """The same comparison without Elasticsearch; returns the write model's orders."""
    orders = await write_model_orders(pool)
    assert orders, "the test wrote no orders"
    await _check_details(pool, orders)
    await _check_listing(pool, orders)
    await _check_stats(pool)
    await _check_quick_lookup(settings, redis, orders)
    return orders


async def _check_details(pool: asyncpg.Pool, orders: dict[str, dict[str, Any]]) -> None:
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM order_details")}
    assert set(rows) == set(orders)
    for order_id, o in orders.items():
        d = rows[order_id]
        for field in (
            "status",
            "total",
            "tracking_number",
            "carrier",
            "cancel_reason",
            "street",
            "city",
            "postal_code",
            "country",
            "customer_name",
            "customer_email",
            "item_count",
            "created_at",
            "confirmed_at",
            "shipped_at",
            "delivered_at",
            "cancelled_at",
            "updated_at",
            "version",
        ):
            assert d[field] == o[field], (order_id, field, d[field], o[field])
        assert d["customer_id"] == str(o["customer_id"])
        items = json.loads(d["items"])
        assert [
            (i["product_name"], i["quantity"], Decimal(str(i["unit_price"]))) for i in items
        ] == [(i["product_name"], i["quantity"], Decimal(str(i["unit_price"]))) for i in o["items"]]


async def _check_listing(pool: asyncpg.Pool, orders: dict[str, dict[str, Any]]) -> None:
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM customer_orders")}
    assert set(rows) == set(orders)
    for order_id, o in orders.items():
        row = rows[order_id]
        assert (row["customer_id"], row["status"], row["total"], row["item_count"]) == (
            str(o["customer_id"]),
            o["status"],
            o["total"],
            o["item_count"],
        ), order_id
        assert (row["created_at"], row["updated_at"]) == (o["created_at"], o["updated_at"])


async def _check_stats(pool: asyncpg.Pool) -> None:
    expected = {
        (r["day"], r["status"]): (r["orders"], r["revenue"])
        for r in await pool.fetch(
            "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, status, count(*) AS orders,"
            " sum(total) AS revenue FROM orders GROUP BY 1, 2"
        )
    }
    actual = {
        (r["day"], r["status"]): (r["orders"], r["revenue"])
        for r in await pool.fetch("SELECT * FROM order_stats_daily WHERE orders <> 0")
    }
    assert actual == expected
    assert not await pool.fetchval("SELECT count(*) FROM order_stats_daily WHERE orders < 0")


async def _check_quick_lookup(
    settings: Settings, redis: Redis, orders: dict[str, dict[str, Any]]
) -> None:
    base = f"{settings.redis.key_prefix}orders:quick:"
    generation = await redis.get(f"{base}current")  # what a reader does first
    assert generation is not None
    for order_id, o in orders.items():
        quick = await redis.hgetall(f"{base}g{generation}:{order_id}")
        assert quick == {
            "status": o["status"],
            "total": str(o["total"]),
            "customer_id": str(o["customer_id"]),
            "item_count": str(o["item_count"]),
            "updated_at": o["updated_at"].isoformat(),
            "_v": str(o["version"]),
        }, order_id


async def _check_search(
    settings: Settings, es: AsyncElasticsearch, orders: dict[str, dict[str, Any]]
) -> None:
    alias = f"{settings.elasticsearch.index_prefix}-orders"
    await es.indices.refresh(index=alias)
    found = await es.search(index=alias, size=10_000, query={"match_all": {}})
    docs = {hit["_id"]: hit["_source"] for hit in found["hits"]["hits"]}
    assert set(docs) == set(orders)
    for order_id, o in orders.items():
        doc = docs[order_id]
        assert doc["status"] == o["status"], order_id
        assert Decimal(str(doc["total"])) == o["total"]
        assert doc["customer_name"] == o["customer_name"]
        assert doc["shipping_city"] == o["city"]
        assert doc["product_names"] == [i["product_name"] for i in o["items"]]
        assert doc["created_at"] == o["created_at"].isoformat()
        assert doc["_v"] == o["version"]


async def eventually(check: Callable[[], Awaitable[object]], timeout_s: float) -> None:
    """Run ``check`` until it stops failing; re-raise its last failure after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await check()
            return
        except Exception:  # not there yet: tables, keys or index may not even exist
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.25)
