"""Benchmark 4: queries under concurrent load, through the API and straight to the store.

The projections are filled first (``events`` events produced to Kafka, then
``engine run --until-caught-up``). Then, for each query, ``concurrency``
clients ask as fast as they can for ``duration_s`` through ``engine api``
(a real uvicorn process), and again with the same concurrency straight to the
store that answers it, for the same data:

- quick lookup: ``GET /orders/{id}/quick`` / Redis ``HGETALL`` of the hash;
- order details: ``GET /orders/{id}`` / Postgres ``SELECT * FROM order_details``;
- customer's orders: ``GET /customers/{id}/orders`` / the Postgres page query
  on ``customer_orders`` (20 rows and one more, to know whether a page follows);
- orders by status: ``GET /orders?status=...`` / the same page query by status;
- search: ``GET /search/orders?text=...`` / Elasticsearch ``_search`` with the
  body the API builds for that text.

The difference is what the API adds: HTTP, validation, the typed answer. The
raw side runs in this process, the API in its own (``api_workers`` of them):
both share the machine's cores with the stores and the load generator, so
compare the ratio, measured in the same run, not the rates across machines.
With ``profile`` the API process runs under pyinstrument (one worker) and the
profile's top is in the result.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import profiling
from bench.common import (
    EngineProcess,
    Isolated,
    applied_by_projection,
    isolated,
    mb,
    poll_until,
    say,
    start_engine,
)
from bench.data import EventStream, produce
from bench.http import HttpError, HttpPool
from bench.stats import rate, summarize
from engine import Resources, Settings, open_resources
from engine.stores.redis import generation_prefix
from projections.orders.demo_data import CATALOG, CITIES
from projections.orders.search import build_search_body, parse_search_query
from projections.orders.wiring import quick_lookup_prefix, search_alias

Call = Callable[[], Awaitable[bool]]  # one query; True if it succeeded
_WORDS = [city for city, *_ in CITIES] + [name.split()[-1] for name, _ in CATALOG]
_STATUSES = ("PENDING", "CONFIRMED", "SHIPPED", "DELIVERED", "CANCELLED")
# The API's own page query (projections.orders.queries): the first page.
_PAGE_SQL = (
    "SELECT id AS order_id, customer_id, status, total, item_count, created_at,"
    " updated_at, version FROM customer_orders WHERE {column} = $1"
    " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
    " ORDER BY created_at DESC, id DESC LIMIT $4"
)


@dataclass(frozen=True)
class QueriesConfig:
    events: int
    duration_s: float
    concurrency: int
    seed: int = 31
    api_workers: int = 1
    profile: bool = False


async def measure(call: Call, concurrency: int, duration_s: float) -> dict[str, Any]:
    """``concurrency`` workers calling ``call`` back to back for ``duration_s``."""
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await call()
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    summary = summarize(latencies)
    return {
        "requests_per_s": rate(len(latencies), elapsed),
        "failures": failures,
        **{k: (v if k == "count" else round(float(v) * 1000, 3)) for k, v in summary.items()},
    }


class _Calls:
    """The three queries, through the API and raw, on random orders and words."""

    def __init__(
        self, resources: Resources, api: HttpPool, ids: list[str], customers: list[str], seed: int
    ) -> None:
        self._resources = resources
        self._api = api
        self._ids = ids
        self._customers = customers
        self._rng = random.Random(seed)
        self._quick = generation_prefix(quick_lookup_prefix(resources), 1)
        self._alias = search_alias(resources)

    def _id(self) -> str:
        return self._rng.choice(self._ids)

    def _word(self) -> str:
        return self._rng.choice(_WORDS)

    def _customer(self) -> str:
        return self._rng.choice(self._customers)

    def _status(self) -> str:
        return self._rng.choice(_STATUSES)

    async def _get(self, path: str) -> bool:
        try:
            status, _ = await self._api.request("GET", path)
        except HttpError:
            return False
        return status == 200

    def pairs(self) -> dict[str, tuple[Call, Call]]:
        return {
            "quick_lookup": (
                lambda: self._get(f"/orders/{self._id()}/quick"),
                self._raw_quick,
            ),
            "order_details": (lambda: self._get(f"/orders/{self._id()}"), self._raw_details),
            "customer_orders": (
                lambda: self._get(f"/customers/{self._customer()}/orders?limit=20"),
                lambda: self._raw_page("customer_id", self._customer()),
            ),
            "orders_by_status": (
                lambda: self._get(f"/orders?status={self._status()}&limit=20"),
                lambda: self._raw_page("status", self._status()),
            ),
            "search": (
                lambda: self._get(f"/search/orders?text={quote(self._word())}&size=20"),
                self._raw_search,
            ),
        }

    async def _raw_quick(self) -> bool:
        return bool(await self._resources.redis.hgetall(self._quick + self._id()))

    async def _raw_details(self) -> bool:
        row = await self._resources.pool.fetchrow(
            "SELECT * FROM order_details WHERE id = $1", self._id()
        )
        return row is not None

    async def _raw_page(self, column: str, value: str) -> bool:
        rows = await self._resources.pool.fetch(
            _PAGE_SQL.format(column=column), value, None, "", 21
        )
        return isinstance(rows, list)

    async def _raw_search(self) -> bool:
        body = build_search_body(parse_search_query({"text": self._word(), "size": 20}))
        found = await self._resources.elasticsearch.search(index=self._alias, body=body)
        return "hits" in found


async def run_queries(base: Settings, config: QueriesConfig, out: Path) -> dict[str, Any]:
    async with isolated(base, "queries") as env, open_resources(env.settings) as resources:
        say(f"queries: loading {config.events:,} events, then {config.concurrency} clients")
        stream = EventStream(config.events, config.seed)
        produced = await produce(env.settings.kafka, stream)
        daemon = await _fill(env, resources, produced.count, out)
        session = out / "profile-api.pyisession"
        profiled = config.profile and profiling.available()
        if config.profile and not profiled:
            say(
                "  --profile: pyinstrument is not installed (pip install -e '.[bench]'): no profile"
            )
        workers = 1 if profiled else config.api_workers
        api = await start_engine(
            env,
            ["api", "--log-level", "warning", "--workers", str(workers)],
            out / "logs",
            "api",
            prefix=profiling.prefix(session) if profiled else (),
        )
        headers = {}
        key = env.settings.api.reader_key or env.settings.api.writer_key
        if key is not None:
            headers["X-API-Key"] = key.get_secret_value()
        client = HttpPool("127.0.0.1", env.settings.api.port, config.concurrency, headers)
        try:
            await _api_ready(client, api)
            customers = await _customers(resources)
            calls = _Calls(resources, client, stream.order_ids, customers, config.seed)
            figures = {
                name: {
                    "api": await measure(through_api, config.concurrency, config.duration_s),
                    "raw": await measure(raw, config.concurrency, config.duration_s),
                }
                for name, (through_api, raw) in calls.pairs().items()
            }
        finally:
            await client.close()
            await api.stop()
    result = {
        "events": config.events,
        "orders": len(stream.order_ids),
        "concurrency": config.concurrency,
        "duration_s": config.duration_s,
        "api_workers": workers,
        "queries": figures,
        "daemon_peak_rss_mb": mb(daemon.peak_rss),
        "api_peak_rss_mb": mb(api.peak_rss if workers == 1 else api.peak_worker_rss),
        "api_cpu_s": round(api.cpu_s + sum(api.worker_cpu_s.values()), 2),
        "profiled": profiled,
    }
    if profiled:
        result["profile"] = await profiling.render(session)
    _print(result)
    return result


async def _customers(resources: Resources) -> list[str]:
    """The customers that have orders (the list query's keys), from the projection."""
    rows = await resources.pool.fetch("SELECT DISTINCT customer_id FROM customer_orders")
    return [row["customer_id"] for row in rows]


async def _fill(env: Isolated, resources: Resources, events: int, out: Path) -> EngineProcess:
    """Run the daemon until every projection has applied every event, then stop it."""
    daemon = await start_engine(env, ["run", "--log-level", "warning"], out / "logs", "daemon")
    topic = env.settings.kafka.topic

    async def filled() -> bool:
        done = await applied_by_projection(resources.pool, topic)
        return len(done) == 5 and min(done.values()) >= events

    try:
        await poll_until("the daemon to fill the projections", filled, 600, 0.2, [daemon])
    finally:
        await daemon.stop()
    return daemon


async def _api_ready(client: HttpPool, api: EngineProcess) -> None:
    async def up() -> bool:
        try:
            return (await client.request("GET", "/health"))[0] == 200
        except HttpError:
            return False

    await poll_until("the API", up, 60, 0.1, [api])


def _print(result: dict[str, Any]) -> None:
    for name, sides in result["queries"].items():
        api, raw = sides["api"], sides["raw"]
        say(
            f"  {name:>13}: API {api['requests_per_s']:,.0f} req/s p50 {api['p50']} ms "
            f"p99 {api['p99']} ms | raw {raw['requests_per_s']:,.0f} req/s p50 {raw['p50']} ms "
            f"p99 {raw['p99']} ms"
        )
