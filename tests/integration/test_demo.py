"""`engine demo` against the real write model: what it loads, and what a rerun does."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from engine import Application, CommandBus, EventRegistry, Settings
from engine.demo import DemoSize
from projections.orders.demo import load_orders_demo, plan_sample
from projections.orders.demo_data import CATALOG
from tests.helpers import run_engine, settings_env

# An application without a demo loader, for the error case (ENGINE_APP names it).
BARE = Application(name="bare", migrations=(), handlers={}, registry=EventRegistry())

_SMALL = ("--customers", "20", "--orders", "50", "--seed", "7")


async def _demo(settings: Settings, *args: str) -> dict[str, Any]:
    code, out, err = await run_engine("demo", *args, "--json", env=settings_env(settings))
    assert code == 0, err
    summary: dict[str, Any] = json.loads(out)
    return summary


async def _counts(pool: asyncpg.Pool, sql: str) -> dict[str, int]:
    return {row[0]: row[1] for row in await pool.fetch(sql)}


async def _write_model(pool: asyncpg.Pool) -> dict[str, Any]:
    return {
        "customers": await pool.fetchval("SELECT count(*) FROM customers"),
        "products": await pool.fetchval("SELECT count(*) FROM products"),
        "orders": await _counts(pool, "SELECT status, count(*) FROM orders GROUP BY status"),
        "events": await _counts(
            pool, "SELECT event_type, count(*) FROM engine_event_log GROUP BY event_type"
        ),
        "outbox": await pool.fetchval("SELECT count(*) FROM engine_outbox"),
    }


async def test_demo_loads_the_sample_its_summary_describes(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    summary = await _demo(settings_for_test, *_SMALL)

    by_status = summary["breakdowns"]["orders_by_status"]
    assert sum(by_status.values()) == 50
    assert summary["counts"]["customers"] == 20
    model = await _write_model(pool)
    assert (model["customers"], model["products"]) == (20, len(CATALOG))
    assert model["orders"] == {status: n for status, n in by_status.items() if n}
    # One event per command, each in the log and in the outbox for the relay.
    assert summary["new"] == summary["commands"] == sum(model["events"].values())
    assert model["outbox"] == summary["commands"]
    events = model["events"]
    assert events["OrderCreated"] == 50
    assert events["OrderDelivered"] == by_status["DELIVERED"]
    assert events["OrderCancelled"] == by_status["CANCELLED"]
    assert events["OrderShipped"] == by_status["SHIPPED"] + by_status["DELIVERED"]
    assert events.get("ShippingAddressChanged", 0) == summary["counts"]["address_changes"]

    samples = summary["samples"]
    order = await pool.fetchrow(
        "SELECT o.city, c.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id"
        " WHERE o.id = $1",
        uuid.UUID(samples["order_id"]),
    )
    assert order is not None
    assert (str(order["id"]), order["name"], order["city"]) == (
        samples["customer_id"],
        samples["customer_name"],
        samples["city"],
    )


async def test_a_rerun_with_the_same_seed_records_nothing_and_says_so(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    first = await _demo(settings_for_test, *_SMALL)
    before = await _write_model(pool)

    code, out, err = await run_engine("demo", *_SMALL, env=settings_env(settings_for_test))

    assert code == 0, err
    assert "nothing new: seed 7 was already loaded" in out
    assert f"all {first['commands']:,} commands were duplicates" in out
    assert await _write_model(pool) == before


async def test_more_orders_with_the_same_seed_adds_only_the_new_ones(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    first = await _demo(settings_for_test, *_SMALL)
    more = await _demo(settings_for_test, "--customers", "20", "--orders", "60", "--seed", "7")

    # The first 50 orders, their customers and the products come back as duplicates.
    assert more["duplicates"] == first["commands"]
    assert more["new"] == more["commands"] - first["commands"] > 0
    model = await _write_model(pool)
    assert model["orders"] == {
        status: n for status, n in more["breakdowns"]["orders_by_status"].items() if n
    }
    assert sum(model["events"].values()) == more["commands"]


async def test_another_seed_loads_a_second_sample_beside_the_first(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    await _demo(settings_for_test, *_SMALL)
    other = await _demo(settings_for_test, "--customers", "5", "--orders", "10", "--seed", "8")

    assert other["duplicates"] == len(CATALOG)  # the catalog is shared by every seed
    model = await _write_model(pool)
    assert (model["customers"], model["products"]) == (25, len(CATALOG))
    assert sum(model["orders"].values()) == 60


async def test_the_loader_reports_progress_up_to_every_command(
    bus: CommandBus, pool: asyncpg.Pool
) -> None:
    seen: list[tuple[int, int]] = []
    size = DemoSize(customers=6, orders=15)

    summary = await load_orders_demo(
        bus, size, 3, 4, lambda done, total: seen.append((done, total))
    )

    plan = plan_sample(size, 3)
    total = sum(len(wave) for wave in plan.waves())
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [done for done, _ in seen] == list(range(total + 1))
    assert summary.commands == summary.new == total
    assert await pool.fetchval("SELECT count(*) FROM orders") == 15


async def test_an_application_without_a_demo_is_a_configuration_error(
    settings_for_test: Settings,
) -> None:
    env = {**settings_env(settings_for_test), "ENGINE_APP": "tests.integration.test_demo:BARE"}
    code, _, err = await run_engine("demo", *_SMALL, env=env)
    assert code == 3
    assert "no demo loader" in err


async def test_an_unreachable_database_exits_4(settings_for_test: Settings) -> None:
    env = {**settings_env(settings_for_test), "ENGINE_POSTGRES__PORT": "1"}
    code, _, err = await run_engine("demo", *_SMALL, env=env)
    assert code == 4
    assert "PostgreSQL is not reachable" in err
