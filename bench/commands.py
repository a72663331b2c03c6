"""Benchmark 6: the command path alone, next to a raw-SQL ceiling measured in the same run.

The workload is orders' life cycles: create an order, confirm it, ship it (three
commands, one after the other per order); products and customers are registered
first, untimed. ``concurrency`` clients each take the next order and send its
three commands, for ``orders`` orders per side. The sides, in this order:

- ``ceiling``: the very statements those commands send, through raw asyncpg,
  one transaction per command, on the same pool. They are not written here:
  the ceiling's commands are first run through the real ``CommandBus`` on a
  connection that records every statement with its arguments, inside an outer
  transaction rolled back afterwards; the ceiling then replays what was
  recorded. So it is the current code's statements, whatever they become, with
  no Python around them (no validation, no handler, no serialization).
- ``bus``: ``CommandBus.execute`` in this process, on the same pool.
- ``api``: through ``engine api`` (a real process) with ``HttpPool`` keep-alive
  connections, the relay and the daemon stopped.
- ``ceiling_loaded`` and ``api_loaded``: the ceiling and the API again with
  ``engine relay`` and ``engine run`` running (caught up first), which is how
  the API runs in production.

Each side checks what it did: every order it handled must be ``SHIPPED`` at
the end. Compare the ratios (API / ceiling, bus / ceiling), measured in the
same run on the same machine, not the rates across machines. With
``profile`` an extra, untimed pass of the bus runs under pyinstrument and
the API runs under pyinstrument (one worker); the profiles' tops are in the
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg

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
from bench.http import HttpError, HttpPool
from bench.lag import request_for
from bench.stats import rate, summarize
from engine import Command, CommandBus, DemoSize, Resources, Settings, open_resources
from projections.orders import APP
from projections.orders.commands import ConfirmOrder, ShipOrder
from projections.orders.demo import (
    SamplePlan,
    customer_command,
    order_commands,
    plan_order,
    plan_sample,
    product_commands,
)

T = TypeVar("T")
SIDES = ("ceiling", "bus", "api", "ceiling_loaded", "api_loaded")


@dataclass(frozen=True)
class CommandsConfig:
    orders: int  # per side; three commands each
    concurrency: int = 16
    customers: int = 200
    seed: int = 13
    profile: bool = False
    api_workers: int = 1  # `engine api --workers`; the profiled API always runs one


@dataclass(frozen=True)
class Statement:
    """One call a command made on its connection: the method, the SQL, the arguments."""

    method: str
    sql: str
    args: tuple[Any, ...]


class _Recorder:
    """A connection that records each statement before sending it.

    Only the methods below exist: a command path that starts using another one
    fails here loudly instead of leaving the ceiling a statement short.
    """

    def __init__(self, conn: asyncpg.Connection[Any], log: list[Statement]) -> None:
        self._conn = conn
        self._log = log

    def transaction(self) -> Any:
        return self._conn.transaction()  # a savepoint: inside the capture's transaction

    def is_in_transaction(self) -> bool:
        return self._conn.is_in_transaction()

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        self._log.append(Statement(method, sql, args))
        return await getattr(self._conn, method)(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self._call("fetch", sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchrow", sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchval", sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        return await self._call("execute", sql, *args)

    async def executemany(self, sql: str, args: Any) -> Any:
        return await self._call("executemany", sql, args)


class _RecordingPool:
    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self._conn = conn
        self.log: list[Statement] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Recorder]:
        yield _Recorder(self._conn, self.log)


async def record_statements(
    pool: asyncpg.Pool, settings: Settings, lifecycles: Sequence[Sequence[Command]]
) -> list[list[list[Statement]]]:
    """What each command of each life cycle sends, recorded through the bus and rolled back."""
    slots = asyncio.Semaphore(settings.postgres.pool_max_size)

    async def one(lifecycle: Sequence[Command]) -> list[list[Statement]]:
        async with slots, pool.acquire() as conn:
            outer = conn.transaction()
            await outer.start()
            try:
                recorded = []
                for command in lifecycle:
                    recording = _RecordingPool(cast("asyncpg.Connection[Any]", conn))
                    bus = CommandBus(
                        cast("asyncpg.Pool", recording), APP.handlers, settings.postgres
                    )
                    await bus.execute(command)
                    recorded.append(recording.log)
                return recorded
            finally:
                await outer.rollback()

    return list(await asyncio.gather(*(one(lifecycle) for lifecycle in lifecycles)))


async def replay(pool: asyncpg.Pool, statements: Sequence[Statement]) -> bool:
    """One command of the ceiling: its recorded statements in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        for statement in statements:
            if statement.method == "executemany":
                await conn.executemany(statement.sql, *statement.args)
            else:
                await getattr(conn, statement.method)(statement.sql, *statement.args)
    return True


@dataclass
class _Side:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)


async def drive(
    lifecycles: Sequence[Sequence[T]], concurrency: int, call: Callable[[T], Awaitable[bool]]
) -> dict[str, Any]:
    """``concurrency`` clients, each taking the next life cycle and sending its steps in turn."""
    side = _Side()
    queue = iter(lifecycles)

    async def client() -> None:
        for lifecycle in queue:
            for step in lifecycle:
                started = time.perf_counter()
                try:
                    ok = await call(step)
                except Exception as exc:  # a failed command is counted, not fatal
                    side.errors = [*side.errors[:4], repr(exc)[:300]]
                    ok = False
                if not ok:
                    side.failures += 1
                    break  # the next steps of this order would fail too
                side.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    summary = summarize(side.latencies)
    return {
        "commands_per_s": rate(len(side.latencies), elapsed),
        "commands": len(side.latencies),
        "failures": side.failures,
        "first_errors": side.errors,
        "seconds": round(elapsed, 3),
        **{k: round(float(v) * 1000, 3) for k, v in summary.items() if k != "count"},
    }


def lifecycles(plan: SamplePlan, first: int, count: int) -> list[list[Command]]:
    """Orders ``first`` to ``first + count - 1`` of the plan: create, confirm, ship each."""
    found = []
    for number in range(first, first + count):
        order = plan_order(plan.seed, number, plan.customers)
        create = order_commands(order, plan.customers[order.customer])[0]
        found.append(
            [
                create,
                ConfirmOrder(order_id=order.order_id),
                ShipOrder(order_id=order.order_id, tracking_number=f"BENCH{number:08d}"),
            ]
        )
    return found


def _order_ids(work: Sequence[Sequence[Command]]) -> list[uuid.UUID]:
    return [cast("ConfirmOrder", steps[1]).order_id for steps in work]


async def _shipped(pool: asyncpg.Pool, work: Sequence[Sequence[Command]]) -> int:
    count = await pool.fetchval(
        "SELECT count(*) FROM orders WHERE id = ANY($1::uuid[]) AND status = 'SHIPPED'",
        _order_ids(work),
    )
    return int(count)


async def _register(resources: Resources, plan: SamplePlan) -> int:
    bus = CommandBus(resources.pool, APP.handlers, resources.settings.postgres)
    commands: list[Command] = [*product_commands()]
    commands += [customer_command(c) for c in plan.customers]
    for start in range(0, len(commands), 50):
        await asyncio.gather(*(bus.execute(c) for c in commands[start : start + 50]))
    return len(commands)


class _Api:
    def __init__(self, env: Isolated, concurrency: int) -> None:
        headers = {}
        if env.settings.api.writer_key is not None:
            headers["X-API-Key"] = env.settings.api.writer_key.get_secret_value()
        self.client = HttpPool("127.0.0.1", env.settings.api.port, concurrency, headers)
        self.errors: list[str] = []

    async def send(self, command: Command) -> bool:
        method, path, body = request_for(command)
        try:
            status, content = await self.client.request(method, path, body)
        except HttpError as exc:
            self.errors = [*self.errors[:4], str(exc)]
            return False
        if status >= 300:
            self.errors = [*self.errors[:4], f"{status} {content[:200]!r}"]
            return False
        return True

    async def ready(self, process: EngineProcess) -> None:
        async def up() -> bool:
            try:
                return (await self.client.request("GET", "/health"))[0] == 200
            except HttpError:
                return False

        await poll_until("the API", up, 60, 0.1, [process])


async def _profile_bus(
    resources: Resources, work: Sequence[Sequence[Command]], concurrency: int, out: Path
) -> dict[str, Any]:
    """An extra pass of the bus under pyinstrument (untimed): where its CPU goes."""
    from pyinstrument import Profiler  # noqa: PLC0415 - optional dependency

    bus = CommandBus(resources.pool, APP.handlers, resources.settings.postgres)
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    await drive(work, concurrency, lambda c: _ok(bus.execute(c)))
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    (out / "profile-bus.tree.txt").write_text(text)
    return {"tree_top": [line for line in text.splitlines() if line.strip()][:60]}


async def _ok(result: Awaitable[object]) -> bool:
    await result
    return True


async def run_commands(base: Settings, config: CommandsConfig, out: Path) -> dict[str, Any]:
    plan = plan_sample(DemoSize(customers=config.customers, orders=0), config.seed)
    n = config.orders
    work = {side: lifecycles(plan, k * n, n) for k, side in enumerate(SIDES)}
    profiled = config.profile and profiling.available()
    async with isolated(base, "commands") as env, open_resources(env.settings) as resources:
        say(f"commands: {n:,} orders x 3 commands per side, {config.concurrency} clients")
        registered = await _register(resources, plan)
        pool = resources.pool
        ceiling = {
            side: [
                s
                for steps in await record_statements(pool, env.settings, work[side])
                for s in steps
            ]
            for side in ("ceiling", "ceiling_loaded")
        }
        per_command = {
            type(c).__name__: len(s)
            for c, s in zip(work["ceiling"][0], ceiling["ceiling"][:3], strict=True)
        }
        # The replay goes per order too: its three commands one after the other.
        replays = {
            side: [ceiling[side][i : i + 3] for i in range(0, len(ceiling[side]), 3)]
            for side in ceiling
        }
        bus = CommandBus(pool, APP.handlers, env.settings.postgres)
        logs = out / "logs"
        quiet = ["--log-level", "warning"]
        session = out / "profile-api.pyisession"
        workers = 1 if profiled else config.api_workers
        api_args = ["api", *quiet, "--workers", str(workers)]
        api = await start_engine(
            env, api_args, logs, "api", prefix=profiling.prefix(session) if profiled else ()
        )
        client = _Api(env, config.concurrency)
        processes: list[EngineProcess] = [api]
        figures: dict[str, Any] = {}
        try:
            await client.ready(api)
            figures["ceiling"] = await drive(
                replays["ceiling"], config.concurrency, lambda s: replay(pool, s)
            )
            figures["bus"] = await drive(
                work["bus"], config.concurrency, lambda c: _ok(bus.execute(c))
            )
            figures["api"] = await drive(work["api"], config.concurrency, client.send)
            processes += [
                await start_engine(env, ["relay", *quiet], logs, "relay"),
                await start_engine(env, ["run", *quiet], logs, "daemon"),
            ]
            await _caught_up(env, resources, processes, registered + 9 * n)
            figures["ceiling_loaded"] = await drive(
                replays["ceiling_loaded"], config.concurrency, lambda s: replay(pool, s)
            )
            figures["api_loaded"] = await drive(work["api_loaded"], config.concurrency, client.send)
            for side in SIDES:
                figures[side]["shipped"] = await _shipped(pool, work[side])
            if profiled:
                profile_bus = await _profile_bus(
                    resources, lifecycles(plan, len(SIDES) * n, n), config.concurrency, out
                )
        finally:
            await client.client.close()
            for process in reversed(processes):
                await process.stop()
    result: dict[str, Any] = {
        "orders_per_side": n,
        "concurrency": config.concurrency,
        "pool_max_size": env.settings.postgres.pool_max_size,
        "statements_per_command": per_command,
        "sides": figures,
        "api_errors": client.errors,
        "ratios": ratios(figures),
        "api_workers": workers,
        "api_peak_rss_mb": mb(api.peak_rss if workers == 1 else api.peak_worker_rss),
        "profiled": profiled,
    }
    if profiled:
        result["profile_bus"] = profile_bus
        result["profile_api"] = await profiling.render(session)
    _print(result)
    return result


async def _caught_up(
    env: Isolated, resources: Resources, processes: list[EngineProcess], events: int
) -> None:
    """The relay has published everything so far and every projection has applied it."""

    async def done() -> bool:
        applied = await applied_by_projection(resources.pool, env.settings.kafka.topic)
        return len(applied) == 5 and min(applied.values()) >= events

    await poll_until("the relay and the daemon to catch up", done, 300, 0.2, processes)


def ratios(figures: dict[str, Any]) -> dict[str, float | None]:
    def over(a: str, b: str) -> float | None:
        top, bottom = figures[a]["commands_per_s"], figures[b]["commands_per_s"]
        return round(top / bottom, 3) if bottom else None

    return {
        "bus_over_ceiling": over("bus", "ceiling"),
        "api_over_ceiling": over("api", "ceiling"),
        "api_loaded_over_ceiling_loaded": over("api_loaded", "ceiling_loaded"),
    }


def _print(result: dict[str, Any]) -> None:
    say(f"  statements per command: {result['statements_per_command']}")
    for side, f in result["sides"].items():
        say(
            f"  {side:>14}: {f['commands_per_s']:,.0f} commands/s p50 {f['p50']} ms "
            f"p99 {f['p99']} ms (failures {f['failures']}, shipped {f['shipped']})"
        )
    say(f"  ratios: {result['ratios']}")
