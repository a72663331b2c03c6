"""``python -m bench.api_path``: CPU per query through the API's application, in process.

The HTTP benchmark (``./dev bench --only queries``) measures requests per
second through a real server, which on a small machine shared with the stores
moves with every other process's load. This one measures what a change to the
request path changes: the CPU time one request costs inside the ASGI
application (routing, dependencies, validation, the store call, the typed
answer), called directly, one request at a time, next to the CPU time of the
bare store call that answers it. No server and no HTTP parsing: that is
uvicorn's part, measured by the HTTP benchmark.

It fills a private environment with a few hundred orders (commands through the
bus, published and projected), then times ``--requests`` of each query.
``--profile`` prints cProfile's top functions by own time for the API side.

CPU time on a machine shared with the stores still moves by a fifth from run
to run, so where Linux lets a process count its own instructions
(``perf_event_open``, ``kernel.perf_event_paranoid`` <= 2) the report also
gives thousands of user-space instructions per call: the same code gives the
same count within a percent or two, whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import os
import pstats
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import isolated
from engine import CommandBus, OutboxRelay, Settings, open_resources
from engine.api import create_app
from engine.daemon import build_runner
from engine.stores.redis import generation_prefix
from projections.orders import APP
from projections.orders.commands import CreateOrder, RegisterCustomer, RegisterProduct
from projections.orders.search import build_search_body, parse_search_query
from projections.orders.wiring import quick_lookup_prefix, search_alias

Call = Callable[[], Awaitable[Any]]

_PERF_EVENT_OPEN = 298  # x86_64 syscall number
_EXCLUDE_KERNEL_AND_HV = (1 << 5) | (1 << 6)


class _Attr(ctypes.Structure):
    """``struct perf_event_attr`` up to its first published size (64 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("bp_addr", ctypes.c_uint64),
    ]


class Instructions:
    """This thread's user-space instructions retired, counted by the kernel."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls) -> Instructions | None:
        """A counter, or None where the kernel does not allow one (or is not x86_64 Linux)."""
        if os.uname().machine != "x86_64":
            return None
        attr = _Attr(type=0, size=ctypes.sizeof(_Attr), config=1, flags=_EXCLUDE_KERNEL_AND_HV)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_PERF_EVENT_OPEN, ctypes.byref(attr), 0, -1, -1, 0)
        return cls(fd) if fd >= 0 else None

    def read(self) -> int:
        return int.from_bytes(os.read(self._fd, 8), "little")

    def close(self) -> None:
        os.close(self._fd)


class _Asgi:
    """Calls an ASGI application directly with a GET and collects the status."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def get(self, path: str, query: str = "") -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"api")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 18080),
        }
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self._app(scope, receive, send)
        return status


async def _fill(settings: Settings, orders: int, seed: int) -> tuple[list[str], list[str]]:
    """Customers, products and orders through the bus, published and projected."""
    rng = random.Random(seed)
    async with open_resources(settings) as resources:
        bus = CommandBus(resources.pool, APP.handlers, settings.postgres)
        customers = []
        for n in range(20):
            customer = RegisterCustomer(name=f"Customer {n}", email=f"c{n}@example.com")
            customers.append((await bus.execute(customer)).aggregate_id)
        products = []
        for n in range(10):
            product = RegisterProduct.model_validate(
                {"name": f"Product {n}", "price": f"{5 + n}.50"}
            )
            products.append((await bus.execute(product)).aggregate_id)
        ids = []
        for n in range(orders):
            command = CreateOrder.model_validate(
                {
                    "customer_id": rng.choice(customers),
                    "items": [{"product_id": rng.choice(products), "quantity": 1 + n % 3}],
                    "shipping_address": {
                        "street": f"{n} Main Street",
                        "city": rng.choice(["Lisbon", "Porto", "Braga"]),
                        "postal_code": "1000-001",
                        "country": "Portugal",
                    },
                }
            )
            ids.append((await bus.execute(command)).aggregate_id)
        await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
        runner = build_runner(APP, resources)
        await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), 300)
        await resources.elasticsearch.indices.refresh(index=search_alias(resources))
    return ids, customers


async def _cost_per_call(
    call: Call, requests: int, counter: Instructions | None, rounds: int = 5
) -> tuple[float, float | None]:
    """Microseconds of this process's CPU, and thousands of instructions, per call.

    One call at a time. The best of ``rounds`` rounds: on a machine shared with
    the stores, other processes only ever add to a round's figure.
    """
    for _ in range(min(50, requests)):  # warm: connections, prepared statements, caches
        await call()
    best, fewest = float("inf"), float("inf")
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        instructions = counter.read() if counter else 0
        started = time.process_time()
        for _ in range(per_round):
            await call()
        best = min(best, (time.process_time() - started) / per_round * 1e6)
        if counter:
            fewest = min(fewest, (counter.read() - instructions) / per_round / 1000)
    return best, (fewest if counter else None)


async def run(requests: int, orders: int, profile: bool) -> None:
    async with isolated(Settings(), "api-path") as env:
        settings = env.settings
        ids, customers = await _fill(settings, orders, 5)
        rng = random.Random(7)
        app = create_app(settings, APP)
        async with app.router.lifespan_context(app), open_resources(settings) as raw:
            api = _Asgi(app)
            quick_prefix = generation_prefix(quick_lookup_prefix(raw), 1)
            alias = search_alias(raw)
            search_body = build_search_body(parse_search_query({"text": "Lisbon", "size": 20}))
            page_sql = (
                "SELECT id AS order_id, customer_id, status, total, item_count, created_at,"
                " updated_at, version FROM customer_orders WHERE customer_id = $1"
                " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
                " ORDER BY created_at DESC, id DESC LIMIT $4"
            )

            def order() -> str:
                return rng.choice(ids)

            async def checked(path: str, query: str = "") -> None:
                status = await api.get(path, query)
                if status != 200:
                    raise SystemExit(f"GET {path}?{query} answered {status}")

            pairs: dict[str, tuple[Call, Call | None]] = {
                "health": (lambda: checked("/health"), None),  # the framework alone
                "quick_lookup": (
                    lambda: checked(f"/orders/{order()}/quick"),
                    lambda: raw.redis.hgetall(quick_prefix + order()),
                ),
                "order_details": (
                    lambda: checked(f"/orders/{order()}"),
                    lambda: raw.pool.fetchrow("SELECT * FROM order_details WHERE id = $1", order()),
                ),
                "customer_orders": (
                    lambda: checked(f"/customers/{rng.choice(customers)}/orders", "limit=20"),
                    lambda: raw.pool.fetch(page_sql, rng.choice(customers), None, "", 21),
                ),
                "search": (
                    lambda: checked("/search/orders", "text=Lisbon&size=20"),
                    lambda: raw.elasticsearch.search(index=alias, body=search_body),
                ),
            }
            counter = Instructions.open()
            print(
                f"{'query':>16} {'API us CPU':>11} {'raw us CPU':>11} {'raw/API':>8}"
                f" {'API kinstr':>11} {'raw kinstr':>11} {'raw/API':>8}"
            )
            try:
                for name, (through_api, bare) in pairs.items():
                    api_us, api_ki = await _cost_per_call(through_api, requests, counter)
                    raw_us, raw_ki = (
                        await _cost_per_call(bare, requests, counter) if bare else (None, None)
                    )
                    print(
                        f"{name:>16} {api_us:11.0f} {_fmt(raw_us)} {_share(raw_us, api_us)}"
                        f" {_fmt(api_ki)} {_fmt(raw_ki)} {_share(raw_ki, api_ki)}"
                    )
            finally:
                if counter:
                    counter.close()
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for name in ("quick_lookup", "order_details"):
                    for _ in range(requests):
                        await pairs[name][0]()
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(35)


def _fmt(value: float | None) -> str:
    return f"{value:11.0f}" if value is not None else f"{'-':>11}"


def _share(part: float | None, whole: float | None) -> str:
    return f"{part / whole:8.2f}" if part is not None and whole else f"{'-':>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per query and side [2000]")
    parser.add_argument("--orders", type=int, default=300, help="orders to fill with [300]")
    parser.add_argument("--profile", action="store_true", help="cProfile the API side")
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.orders, args.profile))


if __name__ == "__main__":
    main()
