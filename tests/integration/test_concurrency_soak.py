"""Concurrency soak: many writers, rebuilds, and SIGKILLed relay and daemon, all at once.

32 writers drive order life cycles through the command bus. Meanwhile every
projection is rebuilt (and one of them twice at the same moment: exactly one
of the pair may run), and the relay and the daemon, real ``engine``
processes, are killed with SIGKILL at seeded random moments and restarted.

Every command's consistency token is checked while all this goes on: once the
gate lets a read through, the read models must show that write (version at
least the command's) in Postgres, Redis and Elasticsearch, every time. At the
end, every store equals a fold of the event log, field by field, for all five
projections.

``ENGINE_SOAK_SECONDS`` (default 45) sets how long the writers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import pytest

from engine import (
    CommandBus,
    CommandResult,
    ConflictError,
    ConsistencyGate,
    ConsistencyToken,
    RedisHashReader,
    Resources,
    RuleViolationError,
    Settings,
)
from engine.errors import EngineError, RebuildInProgressError
from engine.rebuild import RebuildReport, rebuild
from projections.orders import (
    APP,
    RegisterCustomer,
    RegisterProduct,
)
from projections.orders.wiring import quick_lookup_prefix, search_alias
from tests.helpers import order_life_cycle, settings_env, start_engine
from tests.integration.folded import assert_stores_equal_the_log

SOAK_SECONDS = float(os.environ.get("ENGINE_SOAK_SECONDS", "45"))
WRITERS = 32
SEED = 20261123
GATED = ("order_details", "order_quick_lookup", "order_search", "customer_orders")
ALL = (*GATED, "order_stats")


@dataclass
class Tally:
    commands: int = 0
    checked: int = 0
    stale: list[str] = field(default_factory=list)
    last: dict[int, ConsistencyToken] = field(default_factory=dict)  # per partition
    kills: list[str] = field(default_factory=list)
    rebuilds: list[RebuildReport] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


@dataclass
class Soak:
    """What the writers and the token checkers share."""

    bus: CommandBus
    pool: asyncpg.Pool
    resources: Resources
    gate: ConsistencyGate
    partitions: int
    checks: asyncio.Queue[CommandResult]
    stop_writing: asyncio.Event
    tally: Tally


class Processes:
    """The relay and the daemon as real processes, killed and restarted on demand."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.running: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str) -> None:
        self.running[name] = await start_engine(name, "--log-level", "warning", env=self._env)

    async def kill(self, name: str) -> None:
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop_all(self) -> None:
        for name in list(self.running):
            await self.kill(name)


async def _writer(
    soak: Soak, rng: random.Random, customers: list[str], products: list[str]
) -> None:
    while not soak.stop_writing.is_set():
        steps = order_life_cycle(rng, customers, products)
        for command in steps:
            try:
                result = await soak.bus.execute(command)
            except (RuleViolationError, ConflictError):
                break  # e.g. cancelling a delivered order: the rule holds
            soak.tally.commands += 1
            await soak.checks.put(result)


async def _check_tokens(soak: Soak) -> None:
    """Wait for each command's token, then read it back from every store it names."""
    checks, gate, pool, resources, tally = (
        soak.checks,
        soak.gate,
        soak.pool,
        soak.resources,
        soak.tally,
    )
    partitions = soak.partitions
    quick = RedisHashReader(resources.redis, quick_lookup_prefix(resources))
    alias = search_alias(resources)
    while True:
        result = await checks.get()
        try:
            token = ConsistencyToken.of(result, partitions)
            assert token is not None
            if token.position > tally.last.get(token.partition, ConsistencyToken(0, 0)).position:
                tally.last[token.partition] = token
            await gate.wait(GATED, token)
            order_id, version = result.aggregate_id, result.version
            seen = {
                "order_details": await pool.fetchval(
                    "SELECT version FROM order_details WHERE id = $1", order_id
                ),
                "customer_orders": await pool.fetchval(
                    "SELECT version FROM customer_orders WHERE id = $1", order_id
                ),
                "order_quick_lookup": (await quick.get(order_id) or ({}, None))[1],
                "order_search": (
                    await resources.elasticsearch.get(index=alias, id=order_id, realtime=True)
                )["_source"]["_v"],
            }
            for projection, got in seen.items():
                if got is None or got < version:
                    tally.stale.append(f"{token.encode()} v{version}: {projection} has {got}")
            tally.checked += 1
        except EngineError as exc:  # a gate that gave up is reported, never ignored
            tally.stale.append(f"{result.aggregate_id} v{result.version}: {exc}")
        finally:
            checks.task_done()


async def _chaos(
    processes: Processes, rng: random.Random, stop: asyncio.Event, tally: Tally
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(2.0, 6.0))
        if stop.is_set():
            return
        victim = rng.choice(("relay", "run"))
        await processes.kill(victim)
        tally.kills.append(victim)
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        await processes.start(victim)


async def _rebuilds(resources: Resources, tally: Tally) -> None:
    def quiet(_done: int, _total: int) -> None:
        return None

    await asyncio.sleep(SOAK_SECONDS / 6)
    # Two rebuilds of one projection at the same moment: one runs, the other is refused.
    pair = await asyncio.gather(
        rebuild(APP, resources, "order_details", quiet),
        rebuild(APP, resources, "order_details", quiet),
        return_exceptions=True,
    )
    for outcome in pair:
        if isinstance(outcome, RebuildReport):
            tally.rebuilds.append(outcome)
        elif isinstance(outcome, RebuildInProgressError):
            tally.refused.append(str(outcome))
        else:
            raise outcome
    for name in ("order_quick_lookup", "order_search", "customer_orders", "order_stats"):
        tally.rebuilds.append(await rebuild(APP, resources, name, quiet))


@pytest.mark.timeout(900)
async def test_concurrent_writers_rebuilds_and_kills_lose_nothing_and_tokens_are_exact(
    pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources
) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    bus = CommandBus(pool, APP.handlers, settings_for_test.postgres)
    customers = [
        (
            await bus.execute(RegisterCustomer(name=f"Customer {i}", email=f"c{i}@example.com"))
        ).aggregate_id
        for i in range(8)
    ]
    products = [
        (
            await bus.execute(RegisterProduct(name=f"Part {i}", price=Decimal(f"{i + 1}.25")))
        ).aggregate_id
        for i in range(6)
    ]
    processes = Processes(
        {**settings_env(settings_for_test), "ENGINE_RELAY__POLL_INTERVAL_S": "0.2"}
    )
    await processes.start("relay")
    await processes.start("run")
    gate = ConsistencyGate(pool, settings_for_test.kafka.topic, timeout_s=120)
    checks: asyncio.Queue[CommandResult] = asyncio.Queue(maxsize=2000)
    stop_writing, stop_chaos = asyncio.Event(), asyncio.Event()
    soak = Soak(
        bus, pool, resources, gate, settings_for_test.kafka.partitions, checks, stop_writing, tally
    )
    checkers = [asyncio.create_task(_check_tokens(soak)) for _ in range(16)]
    writers = [
        asyncio.create_task(_writer(soak, random.Random(SEED + i), customers, products))
        for i in range(WRITERS)
    ]
    chaos = asyncio.create_task(_chaos(processes, rng, stop_chaos, tally))
    try:
        rebuilding = asyncio.create_task(_rebuilds(resources, tally))
        await asyncio.sleep(SOAK_SECONDS)
        await rebuilding
        stop_writing.set()
        await asyncio.gather(*writers)
        stop_chaos.set()
        await chaos
        await asyncio.wait_for(checks.join(), timeout=300)
        # Every projection (order_stats too) has applied the last write of each partition.
        for token in tally.last.values():
            await gate.wait(ALL, token)
    finally:
        stop_writing.set()
        stop_chaos.set()
        for task in [*checkers, *writers, chaos]:
            task.cancel()
        await asyncio.gather(*checkers, *writers, chaos, return_exceptions=True)
        await processes.stop_all()

    assert tally.commands > WRITERS * 5, tally.commands
    assert tally.checked == tally.commands
    assert not tally.stale, (len(tally.stale), tally.stale[:5])
    assert tally.kills, "the relay and the daemon must have been killed at least once"
    assert len(tally.rebuilds) == 5 and len(tally.refused) == 1, (tally.rebuilds, tally.refused)
    assert "order_details" in tally.refused[0]
    compared = await assert_stores_equal_the_log(APP, resources)
    assert set(compared) == set(ALL) and all(compared.values()), compared
