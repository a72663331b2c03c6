"""Fault soak: steady commands while the daemons, the stores and Postgres fail, then a fix.

Four writers drive order life cycles through the command bus, steadily.
Meanwhile, on a seeded plan:

- the projection daemons (two or three ``engine run`` processes in one
  consumer group) are SIGKILLed and replaced, and join and leave cleanly
  (rebalances); the relay is SIGKILLed and restarted now and then;
- Redis and Elasticsearch are each frozen with SIGSTOP for 15-25 s, the two
  freezes overlapping only partly;
- the stack's Postgres server is stopped and started again (a real restart:
  every session ends, connections are refused while it is down); writers
  retry their command with the same command id until it is recorded;
- poison is produced straight to the topic: garbage bytes, an event whose
  ``occurred_at`` has no time zone, and, for an order no writer touches (the
  *held* order), an ``OrderShipped`` of schema version 3, which these daemons
  do not know, as the order's next version, then its ``OrderDelivered``.

Then the chaos stops and the daemons catch up. Every store must equal a fold
of the event log. The held order's shipment and delivery are not in the log
(they were produced to the topic), so the fold leaves out exactly the events
parked behind the hole: the comparison proves that nothing was folded over it
(the order stays at its last logged version everywhere) and that every other
aggregate lost nothing and doubled nothing (rows, hashes and documents carry
their versions). ``engine status`` must list the held order and the naive
event's aggregate as parked, with the reason.

Then the fix is deployed: ``engine dlq replay --all`` runs with an
application whose registry knows ``OrderShipped`` v3. The held order's
sequence is applied in order and unparked, and every store equals the fold of
the log plus the two produced events. Only the two letters no release can
decode (the garbage and the naive time) are still waiting. (The naive event's
envelope names its aggregate and version, so it parks that aggregate like any
dead letter; it is given an aggregate of its own, which nothing else touches.)

What happened is printed: the plan, every start, kill and leave, processes that
exited on their own (restarted, as a supervisor would), and each projection's
lag every 2 s during the chaos, which shows how long each fault held the
projections back. Process logs are kept in the test's ``tmp_path``.

``ENGINE_SOAK_SECONDS`` (default 45) sets how long the chaos lasts,
``ENGINE_SOAK_SEED`` the seed of every random choice (printed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from engine import (
    CommandBus,
    CommandResult,
    EventEnvelope,
    OutboxRelay,
    Resources,
    RuleViolationError,
    Settings,
    TransientError,
)
from engine.commands import Command
from engine.postgres.deadletters import DeadLetterStore
from engine.stack import StackManager
from engine.stack.process import running
from engine.status import EngineStatus, collect_status
from projections.orders import (
    APP,
    ConfirmOrder,
)
from tests.helpers import (
    new_customer,
    new_order,
    new_product,
    order_life_cycle,
    run_engine,
    settings_env,
)
from tests.integration.chaos import Fleet
from tests.integration.folded import assert_stores_equal_the_log
from tests.integration.newer_release import NEXT
from tests.integration.read.faults import (
    ensure_postgres_up,
    frozen,
    produce_to_topic,
    restart_postgres,
)

SOAK_SECONDS = float(os.environ.get("ENGINE_SOAK_SECONDS", "45"))
SEED = int(os.environ.get("ENGINE_SOAK_SEED", "20261124"))
WRITERS = 4
RUN = ("run", "--log-level", "info")
RELAY = ("relay", "--log-level", "info")
NEXT_APP = "tests.integration.newer_release:NEXT"
GARBAGE = b"\x00\xffnot an event at all"
# What a client retries (the same command, so the same command id): the engine's transient
# errors, and driver errors the bus lets through untranslated after a Postgres restart
# (asyncpg hands out an idle pooled connection that got the server's shutdown notice:
# InternalClientError "cannot switch to state 15; another operation (2) is in progress").
RETRIED = (TransientError,)
LEAKED = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
# A writer gives up on one command after this long (Postgres is down for seconds, not minutes).
COMMAND_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Plan:
    """When each fault starts and how long it lasts, in seconds from the start of the chaos."""

    redis_at: float
    redis_for: float
    es_at: float
    es_for: float
    postgres_at: float
    postgres_down: float
    poison_at: float
    delivered_at: float

    @classmethod
    def draw(cls, rng: random.Random, seconds: float) -> Plan:
        redis_for = min(rng.uniform(15, 25), 0.5 * seconds)
        redis_at = rng.uniform(0.02, 0.12) * seconds
        es_for = min(rng.uniform(15, 25), 0.5 * seconds)
        # Elasticsearch freezes while Redis is still frozen, and stays frozen after it thaws.
        es_at = min(redis_at + rng.uniform(0.4, 0.7) * redis_for, seconds - es_for)
        poison_at = rng.uniform(0.1, 0.3) * seconds
        return cls(
            redis_at=redis_at,
            redis_for=redis_for,
            es_at=es_at,
            es_for=es_for,
            postgres_at=rng.uniform(0.35, 0.6) * seconds,
            postgres_down=rng.uniform(3, 8),
            poison_at=poison_at,
            delivered_at=poison_at + rng.uniform(0.2, 0.4) * seconds,
        )


@dataclass
class Tally:
    commands: int = 0
    duplicates: int = 0  # a retried command that had been recorded before its answer was lost
    retried: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    relay_kills: int = 0
    joins: int = 0
    leaves: list[int | None] = field(default_factory=list)  # exit codes of clean leaves
    faults: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Held:
    """The order whose shipment comes from a newer release, and what is produced for it."""

    order: str
    unknown: bytes  # OrderShipped schema v3, the order's next version
    delivered: bytes  # OrderDelivered, the version after it
    naive: bytes  # an event of another aggregate whose occurred_at has no time zone
    naive_aggregate: str

    @property
    def produced(self) -> list[EventEnvelope]:
        return [EventEnvelope.model_validate_json(v) for v in (self.unknown, self.delivered)]


def _envelope(
    aggregate: str,
    event_type: str,
    schema_version: int,
    version: int,
    payload: dict[str, object],
    *,
    occurred_at: str | None = None,
) -> bytes:
    return json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": event_type,
            "schema_version": schema_version,
            "aggregate_type": "order",
            "aggregate_id": aggregate,
            "aggregate_version": version,
            "position": 10**9 + version,
            "occurred_at": occurred_at or datetime.now(UTC).isoformat(),
            "correlation_id": str(uuid.uuid4()),
            "causation_id": str(uuid.uuid4()),
            "payload": payload,
        }
    ).encode()


async def _held_order(bus: CommandBus) -> Held:
    """A confirmed order (version 2) and the events a newer release writes after it."""
    customer = await new_customer(bus, "Held Customer")
    product = await new_product(bus, "Held Part", "19.99")
    order = (await new_order(bus, customer, [(product, 1)])).aggregate_id
    await bus.execute(ConfirmOrder(order_id=uuid.UUID(order)))

    def change(previous: str, status: str, **extra: str) -> dict[str, object]:
        common = {"order_id": order, "customer_id": customer, "total": "19.99"}
        return {**common, "previous_status": previous, "status": status, **extra}

    shipped = change("CONFIRMED", "SHIPPED", tracking_number="TRK-SOAK", carrier="Owl Post")
    naive_aggregate = str(uuid.uuid4())
    return Held(
        order=order,
        unknown=_envelope(order, "OrderShipped", 3, 3, shipped),
        delivered=_envelope(order, "OrderDelivered", 1, 4, change("SHIPPED", "DELIVERED")),
        naive=_envelope(
            naive_aggregate,
            "OrderConfirmed",
            1,
            1,
            {
                "order_id": naive_aggregate,
                "customer_id": customer,
                "total": "1.00",
                "previous_status": "PENDING",
                "status": "CONFIRMED",
            },
            occurred_at="2026-01-01T00:00:00",
        ),
        naive_aggregate=naive_aggregate,
    )


@dataclass
class Soak:
    """What the phases of the soak share."""

    settings: Settings
    pool: asyncpg.Pool
    resources: Resources
    bus: CommandBus
    fleet: Fleet
    plan: Plan
    rng: random.Random
    held: Held
    customers: list[str]
    products: list[str]
    tally: Tally = field(default_factory=Tally)
    stop_writing: asyncio.Event = field(default_factory=asyncio.Event)
    stop_churn: asyncio.Event = field(default_factory=asyncio.Event)
    leaving: list[asyncio.Task[int | None]] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)  # lag per projection while it went on


def _skip_unless_native(settings: Settings) -> None:
    """The faults signal the stack's own processes: other stacks (containers) cannot be frozen."""
    manager = StackManager(settings, lambda _line: None)
    foreign = [
        name
        for name in ("postgres", "redis", "elasticsearch")
        if running(manager.layout.pid_file(name)) is None
    ]
    if foreign:
        pytest.skip(f"not run by the native local stack here: {', '.join(foreign)}")


async def _prepare(
    pool: asyncpg.Pool, settings: Settings, resources: Resources, logs: Path
) -> Soak:
    _skip_unless_native(settings)
    rng = random.Random(SEED)
    plan = Plan.draw(rng, SOAK_SECONDS)
    print(f"\nfault soak: seed {SEED} (ENGINE_SOAK_SEED), {SOAK_SECONDS:.0f}s of chaos; {plan}")
    print(f"fault soak: process logs in {logs}")
    bus = CommandBus(pool, APP.handlers, settings.postgres)
    customers = [await new_customer(bus, f"Customer {i}") for i in range(6)]
    products = [await new_product(bus, f"Part {i}", f"{i + 1}.25") for i in range(5)]
    held = await _held_order(bus)
    # The held order's logged events reach the topic before anything produced after them.
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    env = {
        **os.environ,
        **settings_env(settings),
        "ENGINE_RELAY__POLL_INTERVAL_S": "0.2",
        "ENGINE_RELAY__BACKOFF_MAX_S": "2",
        "COLUMNS": "250",  # one log record a line
    }
    fleet = Fleet(env, logs)
    return Soak(settings, pool, resources, bus, fleet, plan, rng, held, customers, products)


# -- the writers ------------------------------------------------------------------------


async def _execute(bus: CommandBus, command: Command, tally: Tally) -> CommandResult:
    """Execute ``command``, retrying the same command (same id) while Postgres is away."""
    deadline = time.monotonic() + COMMAND_DEADLINE_S
    while True:
        try:
            result = await bus.execute(command)
        except (*RETRIED, *LEAKED) as exc:
            tally.retried[type(exc).__name__] += 1
            assert time.monotonic() < deadline, f"{command!r} kept failing: {exc!r}"
            await asyncio.sleep(0.2)
            continue
        tally.commands += 1
        tally.duplicates += result.duplicate
        return result


async def _writer(soak: Soak, rng: random.Random) -> None:
    while not soak.stop_writing.is_set():
        for command in order_life_cycle(rng, soak.customers, soak.products):
            try:
                await _execute(soak.bus, command, soak.tally)
            except RuleViolationError:
                break  # e.g. cancelling a delivered order: the rule holds
            await asyncio.sleep(rng.uniform(0.0, 0.03))


# -- the chaos --------------------------------------------------------------------------


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def _churn(soak: Soak) -> None:
    """Kill daemons, let them join and leave (rebalances), kill the relay; 2-3 daemons run."""
    fleet, rng, tally = soak.fleet, soak.rng, soak.tally
    # Paced so the group also has settled stretches: a SIGKILLed member holds the group in
    # a rebalance until its session times out (10 s), and the faults should meet working lanes.
    while not await _stopped_within(soak.stop_churn, rng.uniform(4.0, 8.0)):
        await fleet.revive()
        daemons = fleet.running("run")
        roll = rng.random() if tally.kills else 0.0  # the first move is always a kill
        if roll < 0.45 and daemons:
            await fleet.kill(rng.choice(daemons))
            tally.kills += 1
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            await fleet.start(fleet.new_name("run"), *RUN)
        elif roll < 0.85 and len(daemons) < 3:
            await fleet.start(fleet.new_name("run"), *RUN)
            tally.joins += 1
        elif roll < 0.85:
            # A clean leave takes up to the shutdown bound: the chaos goes on meanwhile.
            soak.leaving.append(asyncio.create_task(fleet.stop(rng.choice(daemons))))
        else:
            await fleet.kill("relay-1")
            tally.relay_kills += 1
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            await fleet.start("relay-1", *RELAY)
        while len(fleet.running("run")) < 2:
            await fleet.start(fleet.new_name("run"), *RUN)


Action = Callable[[], Awaitable[None]]


async def _at(seconds: float, what: str, tally: Tally, action: Action) -> None:
    await asyncio.sleep(seconds)
    started = time.monotonic()
    await action()
    tally.faults.append(f"{what}: at {seconds:.1f}s for {time.monotonic() - started:.1f}s")


def _faults(soak: Soak) -> list[asyncio.Task[None]]:
    settings, plan, held = soak.settings, soak.plan, soak.held

    async def freeze(service: str, seconds: float) -> None:
        async with frozen(settings, service):
            await asyncio.sleep(seconds)

    async def poison() -> None:
        await produce_to_topic(settings, str(uuid.uuid4()), [GARBAGE])
        await produce_to_topic(settings, held.naive_aggregate, [held.naive])
        await produce_to_topic(settings, held.order, [held.unknown])

    async def delivered() -> None:
        await produce_to_topic(settings, held.order, [held.delivered])

    scheduled: list[tuple[float, str, Action]] = [
        (plan.redis_at, "Redis frozen", lambda: freeze("redis", plan.redis_for)),
        (plan.es_at, "Elasticsearch frozen", lambda: freeze("elasticsearch", plan.es_for)),
        (
            plan.postgres_at,
            "Postgres restarted",
            lambda: restart_postgres(settings, plan.postgres_down),
        ),
        (plan.poison_at, "poison produced", poison),
        (plan.delivered_at, "the held order's next event produced", delivered),
    ]
    return [
        asyncio.create_task(_at(at, what, soak.tally, action)) for at, what, action in scheduled
    ]


async def _watch(soak: Soak, stop: asyncio.Event) -> None:
    """Every 2 s, each projection's lag as ``engine status`` shows it: how the faults felt."""
    started = time.monotonic()
    short = {p.name: p.name.split("_")[-1] for p, _ in APP.projections(soak.resources)}
    while not await _stopped_within(stop, 2.0):
        at = time.monotonic() - started
        try:
            status = await asyncio.wait_for(
                collect_status(soak.settings, APP, soak.resources), timeout=5
            )
        except Exception as exc:  # an observer only: Postgres may be down right now
            soak.timeline.append(f"{at:5.1f}s status unavailable: {type(exc).__name__}")
            continue
        lags = " ".join(f"{short[p.name]}={p.lag_events}" for p in status.projections)
        soak.timeline.append(f"{at:5.1f}s lag {lags} outbox={status.outbox.unpublished}")


async def _chaos(soak: Soak) -> None:
    """Writers, churn and faults for SOAK_SECONDS; every fault is undone before this returns."""
    writers = [
        asyncio.create_task(_writer(soak, random.Random(SEED + i))) for i in range(1, WRITERS + 1)
    ]
    churn = asyncio.create_task(_churn(soak))
    faults = _faults(soak)
    stop_watching = asyncio.Event()
    watcher = asyncio.create_task(_watch(soak, stop_watching))
    try:
        await asyncio.sleep(SOAK_SECONDS)
        soak.stop_writing.set()
        soak.stop_churn.set()
        await asyncio.gather(*writers, churn)
        await asyncio.wait_for(asyncio.gather(*faults), timeout=120)
        soak.tally.leaves = list(await asyncio.gather(*soak.leaving))
    finally:
        soak.stop_writing.set()
        soak.stop_churn.set()
        stop_watching.set()
        pending = [*writers, churn, *faults, watcher]
        for task in pending:  # a frozen service is resumed by its task's finally
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await ensure_postgres_up(soak.settings)  # waits for a restart still under way
        # The test's own pools may hold idle connections the restart cut (asyncpg would hand
        # one out and fail on it): replace them, so the checks below meet only live ones.
        await soak.pool.expire_connections()
        await soak.resources.pool.expire_connections()
        await asyncio.gather(*soak.leaving, return_exceptions=True)


# -- catching up and checking -------------------------------------------------------------


async def _until_caught_up(soak: Soak, timeout_s: float) -> EngineStatus:
    """Poll ``engine status`` until no projection lags; the daemons keep running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        await soak.fleet.revive()
        status = await collect_status(soak.settings, APP, soak.resources)
        if status.outbox.unpublished == 0 and all(p.lag_events == 0 for p in status.projections):
            return status
        lagging = {p.name: p.lag_events for p in status.projections if p.lag_events}
        assert time.monotonic() < deadline, (
            f"not caught up after {timeout_s}s: {lagging}\n{soak.fleet.tails()}"
        )
        await asyncio.sleep(0.5)


async def _catch_up(soak: Soak) -> float:
    """Publish what is left, let the running daemons catch up, then a burst run; seconds taken."""
    started = time.monotonic()
    await soak.fleet.stop("relay-1")
    settings = soak.settings
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()
    await _until_caught_up(soak, timeout_s=150)
    took = time.monotonic() - started
    for name in soak.fleet.running("run"):
        soak.tally.leaves.append(await soak.fleet.stop(name))
    # Burst mode from the group's committed offsets: it must find nothing left and return.
    code, out, err = await run_engine("run", "--until-caught-up", env=settings_env(settings))
    assert code == 0, out + err
    return took


def _report(soak: Soak) -> None:
    tally, fleet = soak.tally, soak.fleet
    print("fault soak: " + "\n  ".join(["what happened:", *tally.faults, *fleet.events]))
    print("fault soak: " + "\n  ".join(["engine status during the chaos:", *soak.timeline]))
    print(
        f"fault soak: {tally.commands} commands ({tally.duplicates} answered as duplicates"
        f" after a retry; retried on: {dict(tally.retried)}), {tally.kills} daemons killed,"
        f" {tally.joins} joined, clean leaves exited with {tally.leaves},"
        f" relay killed {tally.relay_kills}x"
    )
    for gone in fleet.exits:
        print(f"fault soak: UNEXPECTED EXIT of {gone.name}, code {gone.code}, at {gone.at_s:.1f}s")
        print(gone.log_tail)


async def _held_row(pool: asyncpg.Pool, order: str) -> tuple[str, int, str | None]:
    row = await pool.fetchrow(
        "SELECT status, version, tracking_number FROM order_details WHERE id = $1", order
    )
    assert row is not None
    return row["status"], row["version"], row["tracking_number"]


async def _check_parked(soak: Soak) -> None:
    """Every projection lists the held order and the naive event's aggregate, with the reason."""
    held = soak.held
    status = await collect_status(soak.settings, APP, soak.resources)
    for projection in status.projections:
        parked = {p.aggregate_id: p for p in projection.parked}
        assert set(parked) == {held.order, held.naive_aggregate}, (projection.name, parked)
        order, naive = parked[held.order], parked[held.naive_aggregate]
        assert (order.projection, order.version) == ("*", 3), order
        assert "UnknownEventError" in order.reason and "OrderShipped v3" in order.reason, order
        assert (naive.projection, naive.version) == ("*", 1), naive
        assert "time zone" in naive.reason, naive
        assert not projection.healthy and projection.dead_letters >= 3, projection
    # Each message once, however often it was delivered again: the three poison messages
    # for every projection (``*``), and the held order's next event parked for each one.
    letters = await DeadLetterStore(soak.pool).list(limit=10_000)
    described = [
        (d.id, d.projection, d.aggregate_id, d.parked_behind, d.error[:80]) for d in letters
    ]
    firsts = [d for d in letters if d.parked_behind is None]
    assert sorted(d.value or b"" for d in firsts) == sorted([GARBAGE, held.naive, held.unknown])
    assert all(d.projection == "*" for d in firsts), described
    behind = [d for d in letters if d.parked_behind is not None]
    assert all(d.value == held.delivered for d in behind), described
    names = sorted(p.name for p in status.projections)
    assert sorted(d.projection for d in behind) == names, described


async def _deploy_the_fix(soak: Soak) -> None:
    """Replay every letter with a release that knows OrderShipped v3."""
    code, out, err = await run_engine(
        "dlq", "replay", "--all", env={**settings_env(soak.settings), "ENGINE_APP": NEXT_APP}
    )
    print(f"fault soak: engine dlq replay --all (the newer release) exited {code}:\n{out}")
    replayed = [line for line in out.splitlines() if "replayed" in line]
    failed = [line for line in out.splitlines() if "failed" in line]
    assert code == 1, out + err  # the garbage and the naive time decode in no release
    assert len(replayed) == 1 and soak.held.order in replayed[0], out
    assert "unparked" in replayed[0], out
    assert len(failed) == 2 and all("still does not decode" in line for line in failed), out


@pytest.mark.timeout(int(SOAK_SECONDS * 2) + 420)
async def test_faults_lose_nothing_and_park_only_what_cannot_be_decoded_until_the_fix(
    pool: asyncpg.Pool, settings_for_test: Settings, resources: Resources, tmp_path: Path
) -> None:
    began = time.monotonic()
    soak = await _prepare(pool, settings_for_test, resources, tmp_path)
    held = soak.held
    try:
        await soak.fleet.start("relay-1", *RELAY)
        for _ in range(2):
            await soak.fleet.start(soak.fleet.new_name("run"), *RUN)
        await _chaos(soak)
        took = await _catch_up(soak)
    finally:
        await soak.fleet.kill_all()
        _report(soak)
    print(f"fault soak: the daemons caught up {took:.1f}s after the chaos")
    assert soak.tally.commands > WRITERS * 10, soak.tally.commands
    assert soak.tally.kills and len(soak.tally.faults) == 5, soak.tally

    # Before the fix: every store equals the fold of the log; the held order waits at v2.
    compared = await assert_stores_equal_the_log(APP, resources)
    assert all(compared.values()), compared
    assert await _held_row(pool, held.order) == ("CONFIRMED", 2, None)
    await _check_parked(soak)

    await _deploy_the_fix(soak)
    compared = await assert_stores_equal_the_log(NEXT, resources, extra=held.produced)
    assert all(compared.values()), compared
    assert await _held_row(pool, held.order) == ("DELIVERED", 4, "TRK-SOAK")
    waiting = await DeadLetterStore(pool).list(limit=10_000)
    assert sorted(d.value or b"" for d in waiting) == sorted([GARBAGE, held.naive]), waiting
    status = await collect_status(settings_for_test, APP, resources)
    for projection in status.projections:
        assert [p.aggregate_id for p in projection.parked] == [held.naive_aggregate], projection
    print(f"fault soak: passed in {time.monotonic() - began:.0f}s")
