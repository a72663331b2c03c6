"""Benchmark 3: the outbox relay, with one and with two ``engine relay`` processes.

Two phases per case, each in a fresh environment:

- backlog: ``events`` committed events (COPY into the event log and the
  outbox) are waiting when the relays start; the rate is events per second
  from the first published batch until the outbox is empty (start-up apart);
- steady: with the relays running, one event per transaction is committed at
  ``rate`` per second for ``duration_s`` (``engine.postgres.outbox.append``,
  what the command bus calls); each event's latency runs from its commit
  returning to its ``published_at``, which the relay sets after Kafka
  acknowledged the whole batch, so it is commit-to-ack and a little more.

Only one relay publishes at a time (a Postgres advisory lock), the other
stands by: two relays are about availability, and the figures show what the
standby costs, if anything.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import EngineProcess, Isolated, isolated, mb, poll_until, say, start_engine
from bench.data import EventStream, copy_to_log, log_row
from bench.stats import rate, summarize
from engine import Settings, create_pool
from engine.postgres import outbox

# The relay's last word: "relay stopped; it published N event(s)" (a log line, text or JSON).
_PUBLISHED = re.compile(r"it published (\d+) event")


@dataclass(frozen=True)
class RelayConfig:
    events: int
    rate: float
    duration_s: float
    seed: int = 23


async def run_relay(base: Settings, config: RelayConfig, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for relays in (1, 2):
        async with isolated(base, f"relay{relays}") as env:
            say(f"relay: {relays} relay process(es), backlog of {config.events:,} events")
            result[f"relays_{relays}"] = await _case(env, relays, config, out)
    _print(result)
    return result


async def _case(env: Isolated, relays: int, config: RelayConfig, out: Path) -> dict[str, Any]:
    pool = await create_pool(env.settings.postgres)
    try:
        async with pool.acquire() as conn:
            await copy_to_log(conn, EventStream(config.events, config.seed), outbox=True)
        spawned = time.perf_counter()
        # Info: the relay's last line, which says how many events it published, is at info.
        processes = [
            await start_engine(env, ["relay", "--log-level", "info"], out / "logs", f"relay{n}")
            for n in range(relays)
        ]
        try:
            backlog = await _drain(pool, config.events, spawned, processes)
            steady = await _steady(pool, config, processes)
        finally:
            for process in processes:
                await process.stop()
    finally:
        await pool.close()
    return {
        "backlog": backlog,
        "steady": steady,
        "published_by_process": [_published(p) for p in processes],
        "peak_rss_mb": [mb(p.peak_rss) for p in processes],
        "cpu_s": [round(p.cpu_s, 2) for p in processes],
    }


async def _pending(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return await outbox.pending_count(conn)


async def _drain(
    pool: asyncpg.Pool, events: int, spawned: float, processes: list[EngineProcess]
) -> dict[str, Any]:
    first_at, first_left = 0.0, events
    left = events
    deadline = time.perf_counter() + max(120.0, events / 200)
    while left:
        await asyncio.sleep(0.05)
        left = await _pending(pool)
        now = time.perf_counter()
        if not first_at and left < events:
            first_at, first_left = now, left
        if now > deadline or any(p.process.returncode is not None for p in processes):
            raise RuntimeError(f"the relay did not drain the outbox ({left} left)")
    done = time.perf_counter()
    return {
        "events": events,
        # Measured from the first published batch: what was left then, over the time it took.
        "events_per_s": rate(first_left, done - first_at),
        "seconds": done - first_at,
        "startup_s": first_at - spawned,
    }


async def _steady(
    pool: asyncpg.Pool, config: RelayConfig, processes: list[EngineProcess]
) -> dict[str, Any]:
    total = int(config.rate * config.duration_s)
    # Another seed: other customers and orders. Products are the same in every seed
    # (and in the backlog already), so they are left out.
    stream = [
        item
        for item in EventStream(total + 100, config.seed + 1)
        if item.envelope.aggregate_type != "product"
    ][:total]
    committed: dict[int, float] = {}
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    for n, item in enumerate(stream):
        delay = started + n / config.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_commit(pool, log_row(item.envelope), committed))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sending_s = time.perf_counter() - started
    await asyncio.gather(*tasks)

    async def drained() -> bool:
        return await _pending(pool) == 0

    await poll_until("the relay to publish", drained, 60, 0.05, processes)
    rows = await pool.fetch(
        "SELECT position, extract(epoch FROM published_at)::float8 AS at FROM engine_outbox"
        " WHERE position = ANY($1::bigint[])",
        list(committed),
    )
    latencies = [row["at"] - committed[row["position"]] for row in rows]
    return {
        "events": total,
        "committed_per_s": rate(total, sending_s),
        "latency_ms": {
            k: (v if k == "count" else round(float(v) * 1000, 2))
            for k, v in summarize(latencies).items()
        },
        "latency_from": "commit returned (client clock) to published_at (after Kafka's ack)",
    }


async def _commit(pool: asyncpg.Pool, row: tuple[Any, ...], committed: dict[int, float]) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            envelopes = await outbox.append(conn, [row])
        committed[envelopes[0].position] = time.time()


def _published(process: EngineProcess) -> int | None:
    found = _PUBLISHED.findall(process.log_tail(4000))
    return int(found[-1]) if found else None


def _print(result: dict[str, Any]) -> None:
    for case, figures in result.items():
        backlog, steady = figures["backlog"], figures["steady"]
        latency = steady["latency_ms"]
        say(
            f"  {case}: backlog {backlog['events_per_s']:,.0f} ev/s; steady "
            f"{steady['committed_per_s']:.0f}/s commit->ack p50 {latency['p50']} ms, "
            f"p99 {latency['p99']} ms; published per process {figures['published_by_process']}"
        )
