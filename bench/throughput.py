"""Benchmark 1: projection throughput, next to its ceiling and a naive baseline.

N events of order life cycles are produced to a fresh topic (the engine's
codec and partitioning, as the relay would send them). A real ``engine run``
process then projects them into all five projections; the harness watches
``engine_partition_progress`` until every projection has finished every
partition, and counts the result in each store. Then, in the same run and on
the same topic: the ceiling (:mod:`bench.ceiling`) and the naive baseline
(:mod:`bench.naive`).

The engine's rate is measured from its first finished batch (process start-up
and the consumer group join are reported apart) to its last.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import profiling
from bench.ceiling import kafka_consume_seconds, store_ceilings
from bench.common import (
    BenchError,
    EngineProcess,
    Isolated,
    applied_by_projection,
    isolated,
    mb,
    say,
    start_engine,
)
from bench.data import EventStream, Produced, produce
from bench.naive import naive_baseline, stream_rate
from bench.stats import rate, ratio, slowest
from engine import Resources, Settings, open_resources
from projections.orders import APP
from projections.orders.wiring import quick_lookup_prefix, search_alias

# The stores' own ceilings are written in batches of this many events, whatever the
# daemon's batch size: a smaller daemon batch must not lower the bar it is measured by.
CEILING_BATCH = 1_000


@dataclass(frozen=True)
class ThroughputConfig:
    events: int
    baseline_events: int
    profile: bool = False
    seed: int = 7
    # Also run `engine run --workers N` for each N here, on a topic of its own with
    # the same events, next to the one-process run (0 or empty: skip).
    more_workers: tuple[int, ...] = (2,)


async def run_throughput(base: Settings, config: ThroughputConfig, out: Path) -> dict[str, Any]:
    stream = EventStream(config.events, config.seed)
    async with isolated(base, "throughput") as env, open_resources(env.settings) as resources:
        say(f"throughput: generating and producing {config.events:,} events")
        started = time.perf_counter()
        produced = await produce(env.settings.kafka, stream)
        load_s = time.perf_counter() - started
        say(f"  produced in {load_s:.1f}s; running the daemon (engine run --workers 1)")
        engine = await _engine(env, resources, produced, out, config.profile, workers=1)
        engine["verified"] = await verify(resources, len(stream.order_ids))
        say(f"  engine: {engine['events_per_s']:,.0f} events/s; measuring the ceiling")
        batch = CEILING_BATCH
        kafka_s = await kafka_consume_seconds(env.settings.kafka, produced.count, batch)
        ceiling = await store_ceilings(resources, produced.count, batch)
        ceiling["kafka_consume_per_s"] = rate(produced.count, kafka_s)
        say(f"  naive baseline on {config.baseline_events:,} events")
        baseline = await naive_baseline(
            resources, produced.end_offsets, config.baseline_events, batch
        )
        baseline["events_per_s"] = stream_rate(
            baseline, produced.count, produced.count - stream.prefix
        )
    workers: dict[int, dict[str, Any]] = {}
    for n in config.more_workers:
        workers[n] = await _with_workers(base, stream, n, out)
    result = _summary(
        config=config,
        stream=stream,
        load_s=load_s,
        engine=engine,
        ceiling=ceiling,
        baseline=baseline,
        workers=workers,
    )
    _print(result)
    return result


async def _with_workers(base: Settings, stream: EventStream, n: int, out: Path) -> dict[str, Any]:
    """The same events projected by ``engine run --workers n``, in a fresh namespace."""
    async with isolated(base, f"throughput-{n}w") as env, open_resources(env.settings) as resources:
        say(f"  {n} workers: producing the same {stream.total:,} events to a topic of their own")
        produced = await produce(env.settings.kafka, stream)
        engine = await _engine(env, resources, produced, out, False, workers=n)
        engine["verified"] = await verify(resources, len(stream.order_ids))
        say(f"  engine, {n} workers: {engine['events_per_s']:,.0f} events/s")
        return engine


def _summary(
    *,
    config: ThroughputConfig,
    stream: EventStream,
    load_s: float,
    engine: dict[str, Any],
    ceiling: dict[str, Any],
    baseline: dict[str, Any],
    workers: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    bounds = {
        "kafka_consume": ceiling["kafka_consume_per_s"],
        "postgres": ceiling["postgres_per_s"],
        "redis": ceiling["redis_per_s"],
        "elasticsearch": ceiling["elasticsearch_per_s"],
    }
    name, bound = slowest(bounds)
    ceiling["slowest"] = name
    ceiling["bound_per_s"] = bound
    # On 2 cores the stores share the CPU: with no overlap at all, the stores
    # one after the other bound a pipeline that writes all of them.
    store_seconds = sum(ceiling["seconds"][s] for s in ("postgres", "redis", "elasticsearch"))
    ceiling["all_stores_in_sequence_per_s"] = rate(stream.total, store_seconds)
    in_sequence = ceiling["all_stores_in_sequence_per_s"]
    by_workers = {
        str(n): {
            "engine": run,
            "ratios": {
                "engine_over_ceiling": ratio(run["events_per_s"], bound),
                "engine_over_baseline": ratio(run["events_per_s"], baseline["events_per_s"]),
                "engine_over_all_stores_in_sequence": ratio(run["events_per_s"], in_sequence),
            },
        }
        for n, run in (workers or {}).items()
    }
    return {
        "events": stream.total,
        "orders": len(stream.order_ids),
        "opening_registrations": stream.prefix,
        "load": {"path": "produced to Kafka (engine codec + partition_for)", "seconds": load_s},
        "engine": engine,
        "ceiling": ceiling,
        "baseline": baseline,
        "ratios": {
            "engine_over_ceiling": ratio(engine["events_per_s"], bound),
            "engine_over_baseline": ratio(engine["events_per_s"], baseline["events_per_s"]),
            "engine_over_all_stores_in_sequence": ratio(
                engine["events_per_s"], ceiling["all_stores_in_sequence_per_s"]
            ),
        },
        "profiled": engine.get("profile") is not None,
        "workers": by_workers,
    }


async def _engine(
    env: Isolated,
    resources: Resources,
    produced: Produced,
    out: Path,
    profile: bool,
    *,
    workers: int,
) -> dict[str, Any]:
    session = out / "profile-daemon.pyisession"
    if profile and not profiling.available():
        say("  --profile: pyinstrument is not installed (pip install -e '.[bench]'): no profile")
    prefix = profiling.prefix(session) if profile and profiling.available() else []
    names = [projection.name for projection, _ in APP.projections(resources)]
    spawned = time.perf_counter()
    daemon = await start_engine(
        env,
        ["run", "--log-level", "warning"],
        out / "logs",
        "daemon" if workers == 1 else f"daemon-{workers}w",
        prefix=prefix,
        workers=workers,
    )
    try:
        watch = await _watch(daemon, resources.pool, env.settings.kafka.topic, names, produced)
    finally:
        await daemon.stop()
    first_at, first_done, done_at, samples = watch
    finished = max(done_at.values())
    result: dict[str, Any] = {
        "events_per_s": rate(produced.count - first_done, finished - first_at),
        "seconds": finished - first_at,
        "startup_s": first_at - spawned,
        "wall_s": finished - spawned,
        "wall_events_per_s": rate(produced.count, finished - spawned),
        "done_after_s": {name: at - spawned for name, at in sorted(done_at.items())},
        "workers": workers,
        "events": produced.count,
        # Per process: with workers, the largest worker's (the supervisor is small).
        "daemon_peak_rss_mb": mb(daemon.peak_rss if workers == 1 else daemon.peak_worker_rss),
        "rss_source": "engine run subprocess (its workers with --workers N), /proc VmHWM",
        "cpu_s": daemon.cpu_s + sum(daemon.worker_cpu_s.values()),
        "applied_over_time": [(round(at - spawned, 2), n) for at, n in samples],
    }
    if prefix:
        result["profile"] = await profiling.render(session)
    return result


async def _watch(
    daemon: EngineProcess, pool: asyncpg.Pool, topic: str, names: list[str], produced: Produced
) -> tuple[float, int, dict[str, float], list[tuple[float, int]]]:
    """Poll progress until every projection has applied every event."""
    deadline = time.perf_counter() + max(300.0, produced.count / 200)
    first_at, first_done = 0.0, 0
    done_at: dict[str, float] = {}
    samples: list[tuple[float, int]] = []
    while len(done_at) < len(names):
        await asyncio.sleep(0.1)
        progress = await applied_by_projection(pool, topic)
        now = time.perf_counter()
        least = min(progress.get(name, 0) for name in names)
        samples.append((now, least))
        if not first_at and progress:
            first_at, first_done = now, least
        for name in names:
            if progress.get(name, 0) >= produced.count:
                done_at.setdefault(name, now)
        if daemon.process.returncode is not None or now > deadline:
            raise BenchError(f"the daemon did not finish: {progress}\n{daemon.log_tail()}")
    return first_at, first_done, done_at, samples


async def verify(resources: Resources, orders: int) -> dict[str, Any]:
    """Count what each store holds: every order must be there once."""
    pool = resources.pool
    quick = f"{quick_lookup_prefix(resources)}g1:*"
    keys = 0
    async for _ in resources.redis.scan_iter(match=quick, count=5000):
        keys += 1
    alias = search_alias(resources)
    await resources.elasticsearch.indices.refresh(index=alias)
    found = await resources.elasticsearch.count(index=alias)
    counts = {
        "order_details": int(await pool.fetchval("SELECT count(*) FROM order_details")),
        "customer_orders": int(await pool.fetchval("SELECT count(*) FROM customer_orders")),
        "order_stats": int(
            await pool.fetchval("SELECT coalesce(sum(orders), 0) FROM order_stats_daily")
        ),
        "order_quick_lookup": keys,
        "order_search": int(found["count"]),
    }
    return {"expected_orders": orders, "counts": counts, "ok": set(counts.values()) == {orders}}


def _print(result: dict[str, Any]) -> None:
    engine, ceiling, baseline, ratios = (
        result["engine"],
        result["ceiling"],
        result["baseline"],
        result["ratios"],
    )
    say(
        f"  engine {engine['events_per_s']:,.0f} ev/s over {engine['seconds']:.1f}s "
        f"(+{engine['startup_s']:.1f}s start-up), daemon peak RSS "
        f"{engine['daemon_peak_rss_mb']} MB, verified: {engine['verified']['ok']}"
    )
    say(
        "  ceiling ev/s: "
        + ", ".join(
            f"{key.removesuffix('_per_s')} {ceiling[key]:,.0f}"
            for key in (
                "kafka_consume_per_s",
                "postgres_per_s",
                "redis_per_s",
                "elasticsearch_per_s",
                "decode_per_s",
            )
        )
        + f"; slowest: {ceiling['slowest']}"
    )
    say(f"  naive baseline {baseline['events_per_s']:,.0f} ev/s (stream-adjusted)")
    for n, run in result["workers"].items():
        say(
            f"  {n} workers: {run['engine']['events_per_s']:,.0f} ev/s, engine / ceiling = "
            f"{_fmt(run['ratios']['engine_over_ceiling'])}, peak RSS per worker "
            f"{run['engine']['daemon_peak_rss_mb']} MB, verified: "
            f"{run['engine']['verified']['ok']}"
        )
    say(
        f"  engine / ceiling = {_fmt(ratios['engine_over_ceiling'])}, "
        f"engine / baseline = {_fmt(ratios['engine_over_baseline'])}x"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
