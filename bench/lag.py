"""Benchmark 2: end-to-end lag under a steady load of commands through the HTTP API.

Three real processes run as in production: ``engine api`` (uvicorn),
``engine relay`` and ``engine run``. Products and customers are registered
first (through the command bus, untimed). Then commands are sent at a fixed
rate (open loop: each on its own schedule, whatever the answers to the
previous ones) for a fixed time: new orders, and the next step of orders
already placed (confirm, change address, ship, deliver, cancel), from the
demo's life-cycle plans. For each event, the lag is from the command's 2xx
answer (after its commit) to the moment each store shows it
(:mod:`bench.visibility`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from bench.report import describe_refresh
from bench.stats import rate, summarize, windows
from bench.visibility import STORES, Event, Pollers, Tracker
from engine import Command, CommandBus, DemoSize, Resources, Settings, open_resources
from projections.orders import APP
from projections.orders.commands import CreateOrder, OrderCommand
from projections.orders.demo import (
    SamplePlan,
    customer_command,
    order_commands,
    plan_order,
    plan_sample,
    product_commands,
)

_PATHS = {
    "ConfirmOrder": ("POST", "confirm"),
    "ShipOrder": ("POST", "ship"),
    "DeliverOrder": ("POST", "deliver"),
    "CancelOrder": ("POST", "cancel"),
    "ChangeShippingAddress": ("PUT", "shipping-address"),
}
# An order's next step is picked over a new order this often (when one is ready):
# about the demo's mix of 1 creation to 2.5 later steps.
STEP_SHARE = 0.7


@dataclass(frozen=True)
class LagConfig:
    rate: float
    duration_s: float
    customers: int = 300
    max_in_flight: int = 400
    seed: int = 11
    api_workers: int = 1  # `engine api --workers`


def request_for(command: Command) -> tuple[str, str, dict[str, Any]]:
    """(method, path, JSON body) of the API call that carries ``command``."""
    if isinstance(command, CreateOrder):
        return "POST", "/orders", command.model_dump(mode="json", exclude_none=True)
    assert isinstance(command, OrderCommand)
    method, action = _PATHS[type(command).__name__]
    body = command.model_dump(mode="json", exclude_none=True, exclude={"order_id"})
    return method, f"/orders/{command.order_id}/{action}", body


@dataclass
class _Load:
    """The open-loop driver's state: orders placed, steps ready, what happened.

    Orders are planned as they are placed (the demo's plan for order number n),
    so the load never runs out of them, whatever the rate.
    """

    plan: SamplePlan
    rng: random.Random
    commands: dict[int, list[Command]] = field(default_factory=dict)
    ready: deque[tuple[int, int]] = field(default_factory=deque)
    placed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def pick(self) -> tuple[int, int]:
        """(order, step) to send next: a ready step, or a new order."""
        if self.ready and self.rng.random() < STEP_SHARE:
            return self.ready.popleft()
        number = self.placed
        self.placed += 1
        order = plan_order(self.plan.seed, number, self.plan.customers)
        self.commands[number] = order_commands(order, self.plan.customers[order.customer])
        return number, 0

    def command(self, order: int, step: int) -> Command:
        return self.commands[order][step]

    def done(self, order: int, step: int) -> None:
        if step + 1 < len(self.commands[order]):
            self.ready.append((order, step + 1))
        else:
            del self.commands[order]


async def _send(client: HttpPool, load: _Load, tracker: Tracker, order: int, step: int) -> None:
    method, path, body = request_for(load.command(order, step))
    sent = time.perf_counter()
    try:
        status, content = await client.request(method, path, body)
    except HttpError as exc:
        load.outcomes["connection error"] += 1
        load.errors = [*load.errors[:4], str(exc)]
        return
    acked = time.perf_counter()
    load.outcomes[str(status)] += 1
    if status >= 300:
        load.errors = [*load.errors[:4], f"{status} {content[:200]!r}"]
        return
    load.latencies.append(acked - sent)
    answer = json.loads(content)
    partition, position = (int(part) for part in answer["consistency_token"].split("."))
    tracker.add(Event(answer["aggregate_id"], answer["version"], partition, position, sent, acked))
    load.done(order, step)


async def drive(
    client: HttpPool, load: _Load, tracker: Tracker, config: LagConfig
) -> dict[str, Any]:
    """Send ``rate`` commands a second for ``duration_s``, each at its scheduled time."""
    total = int(config.rate * config.duration_s)
    in_flight: set[asyncio.Task[None]] = set()
    skipped = 0
    started = time.perf_counter()
    for n in range(total):
        delay = started + n / config.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= config.max_in_flight:
            skipped += 1
            continue
        task = asyncio.create_task(_send(client, load, tracker, *load.pick()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    sending_s = time.perf_counter() - started
    await asyncio.gather(*in_flight)
    return {
        "scheduled": total,
        "sent": total - skipped,
        "skipped_over_in_flight_cap": skipped,
        "achieved_per_s": rate(total - skipped, sending_s),
        "outcomes": dict(load.outcomes),
        "first_errors": load.errors,
        "latency_ms": _ms(summarize(load.latencies)),
    }


def _ms(summary: dict[str, float | int]) -> dict[str, float | int]:
    return {k: (v if k == "count" else round(float(v) * 1000, 2)) for k, v in summary.items()}


async def _register(resources: Resources, plan: SamplePlan) -> int:
    """Products and customers, straight through the bus (not part of the measurement)."""
    bus = CommandBus(resources.pool, APP.handlers, resources.settings.postgres)
    commands: list[Command] = [*product_commands()]
    commands += [customer_command(c) for c in plan.customers]
    for start in range(0, len(commands), 50):
        await asyncio.gather(*(bus.execute(c) for c in commands[start : start + 50]))
    return len(commands)


async def run_lag(base: Settings, config: LagConfig, out: Path) -> dict[str, Any]:
    plan = plan_sample(DemoSize(customers=config.customers, orders=0), config.seed)
    async with isolated(base, "lag") as env, open_resources(env.settings) as resources:
        say(f"lag: {config.rate:g} commands/s for {config.duration_s:g}s through the API")
        registered = await _register(resources, plan)
        processes = await _start(env, out, config.api_workers)
        try:
            await _ready(env, resources, processes, registered)
            result = await _measure(env, resources, plan, config)
        finally:
            for process in processes.values():
                await process.stop()
        result["search_refresh"] = search_refresh(env.settings)
        result["api_workers"] = config.api_workers
        result["peak_rss_mb"] = {name: mb(p.peak_rss) for name, p in processes.items()}
        result["cpu_s"] = {name: round(p.cpu_s, 2) for name, p in processes.items()}
        result["daemon_peak_rss_mb"] = result["peak_rss_mb"]["daemon"]
    _print(result)
    return result


async def _start(env: Isolated, out: Path, api_workers: int) -> dict[str, EngineProcess]:
    logs = out / "logs"
    quiet = ["--log-level", "warning"]
    api = ["api", *quiet, "--workers", str(api_workers)]
    return {
        "daemon": await start_engine(env, ["run", *quiet], logs, "daemon"),
        "relay": await start_engine(env, ["relay", *quiet], logs, "relay"),
        "api": await start_engine(env, api, logs, "api"),
    }


async def _ready(
    env: Isolated, resources: Resources, processes: dict[str, EngineProcess], events: int
) -> None:
    """The API answers and every projection has passed the registrations."""
    watch = list(processes.values())
    client = HttpPool("127.0.0.1", env.settings.api.port, 1)

    async def api_up() -> bool:
        try:
            return (await client.request("GET", "/health"))[0] == 200
        except HttpError:
            return False

    async def caught_up() -> bool:
        done = await applied_by_projection(resources.pool, env.settings.kafka.topic)
        return len(done) == 5 and min(done.values()) >= events

    try:
        await poll_until("the API", api_up, 60, 0.1, watch)
    finally:
        await client.close()
    await poll_until("the daemon to catch up", caught_up, 120, 0.1, watch)


async def _measure(
    env: Isolated, resources: Resources, plan: SamplePlan, config: LagConfig
) -> dict[str, Any]:
    tracker = Tracker([projection.name for projection, _ in APP.projections(resources)])
    pollers = Pollers(resources, tracker)
    load = _Load(plan, random.Random(config.seed))
    headers = {}
    if env.settings.api.writer_key is not None:
        headers["X-API-Key"] = env.settings.api.writer_key.get_secret_value()
    client = HttpPool("127.0.0.1", env.settings.api.port, config.max_in_flight, headers)
    pollers.start()
    cpu = time.process_time()
    try:
        try:
            commands = await drive(client, load, tracker, config)
        finally:
            await client.close()
        for _ in range(600):  # let the last events show up, 30 s at most
            if not tracker.pending():
                break
            await asyncio.sleep(0.05)
    finally:
        await pollers.stop()
    commands["harness_cpu_s"] = round(time.process_time() - cpu, 2)
    return _figures(config, commands, tracker, pollers.polls)


def sustained(rate: float, commands: dict[str, Any]) -> bool:
    """Whether the API kept up with ``rate``: the lags then describe that rate, not a queue.

    Kept up: at least 90% of the rate achieved, no command skipped at the
    in-flight cap, and command latency p99 under a second (an API falling
    behind shows as queueing long before the cap is reached).
    """
    return bool(
        commands["achieved_per_s"] >= 0.9 * rate
        and commands["skipped_over_in_flight_cap"] == 0
        and commands["latency_ms"]["p99"] < 1000
    )


def search_refresh(settings: Settings) -> dict[str, Any]:
    """The search index's refresh policy the daemon ran with (engine.stores.refresh)."""
    search = settings.elasticsearch
    policy: dict[str, Any] = {"policy": search.refresh, "refresh_interval": search.refresh_interval}
    if search.refresh == "after_write":
        policy["min_gap_ms"] = search.refresh_min_gap_ms
    return policy


def _figures(
    config: LagConfig, commands: dict[str, Any], tracker: Tracker, polls: dict[str, int]
) -> dict[str, Any]:
    events = tracker.events
    start = min((e.sent_at for e in events), default=0.0)
    visible: dict[str, Any] = {}
    series: dict[str, list[dict[str, float]]] = {}
    for target in (*STORES, *tracker.projections):
        lags = [
            (e.acked_at - start, e.seen[target] - e.acked_at) for e in events if target in e.seen
        ]
        visible[target] = {
            **_ms(summarize([lag for _, lag in lags])),
            "not_visible": len(events) - len(lags),
        }
        if target in STORES:
            series[target] = [
                {"t": at, "p50_ms": _p(values, 50), "p99_ms": _p(values, 99), "n": len(values)}
                for at, values in windows(lags)
            ]
    return {
        "rate": config.rate,
        "duration_s": config.duration_s,
        "commands": commands,
        "sustained": sustained(config.rate, commands),
        "events": len(events),
        "lag_ms": {store: visible[store] for store in STORES},
        "applied_lag_ms": {p: visible[p] for p in tracker.projections},
        "lag_over_time": series,
        "polls": polls,
        "lag_from": "the command's 2xx answer (after commit) to the end of the first poll "
        "that saw it",
    }


def _p(values: list[float], q: float) -> float:
    return round(summarize(values)[f"p{q}"] * 1000, 2)


def _print(result: dict[str, Any]) -> None:
    commands = result["commands"]
    say(
        f"  sent {commands['sent']:,} commands at {commands['achieved_per_s']:.0f}/s "
        f"(outcomes {commands['outcomes']}), command p50 {commands['latency_ms']['p50']} ms"
    )
    for store, figures in result["lag_ms"].items():
        say(
            f"  {store:>13} lag ms: p50 {figures['p50']}, p95 {figures['p95']}, "
            f"p99 {figures['p99']}, max {figures['max']} (not visible: {figures['not_visible']})"
        )
    say(
        f"  rate {'sustained' if result['sustained'] else 'NOT sustained'}; search refresh "
        f"{describe_refresh(result['search_refresh'])}"
    )
    say(f"  daemon peak RSS {result['daemon_peak_rss_mb']} MB")
