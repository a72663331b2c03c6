"""`engine status`: position, lag, dead letters and errors of each projection, on the real stack."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import pytest

from engine import CommandBus, CommandResult, OutboxRelay, Resources, ServiceUnavailableError
from engine.daemon import build_runner
from engine.postgres.checkpoints import CheckpointStore, PartitionProgress
from engine.postgres.deadletters import DeadLetterStore, NewDeadLetter
from engine.settings import Settings
from engine.status import EngineStatus, ProjectionStatus, collect_status
from projections.orders import APP
from tests.helpers import new_customer, new_order, new_product, run_engine, settings_env


async def _relay(settings: Settings) -> int:
    return await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()


async def _run_daemon(resources: Resources) -> None:
    runner = build_runner(APP, resources)
    await asyncio.wait_for(runner.run(asyncio.Event(), until_caught_up=True), timeout=90)


async def _orders(bus: CommandBus, count: int) -> CommandResult:
    """A customer, a product and ``count`` orders: the result of the last one."""
    customer, product = await new_customer(bus), await new_product(bus)
    results = [await new_order(bus, customer, [(product, 1)]) for _ in range(count)]
    return results[-1]


async def _events_after(pool: asyncpg.Pool, position: int) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM engine_event_log WHERE position > $1", position)
    )


async def _status(settings: Settings, resources: Resources) -> dict[str, ProjectionStatus]:
    status = await collect_status(settings, APP, resources)
    names = [projection.name for projection, _store in APP.projections(resources)]
    assert [p.name for p in status.projections] == names
    return {p.name: p for p in status.projections}


def _assert_lag_is_age_of(status: EngineStatus, published_from: datetime, to: datetime) -> None:
    """Every projection lags by the age of its oldest event not applied, published in this span."""
    most = (status.collected_at - published_from).total_seconds() + 0.001  # Kafka keeps ms
    least = (status.collected_at - to).total_seconds() - 0.001
    for p in status.projections:
        assert p.lag_seconds is not None, p
        assert least <= p.lag_seconds <= most, (p.name, p.lag_seconds, least, most)


def _letter(projection: str, offset: int) -> NewDeadLetter:
    return NewDeadLetter(
        projection=projection,
        topic="orders.events",
        partition=0,
        offset=offset,
        key=None,
        value=b"\x00not json",
        headers={},
        event_type=None,
        error="EventDecodeError: message is not an event envelope",
        attempts=1,
    )


async def test_lag_counts_published_events_until_the_daemon_has_applied_them(
    bus: CommandBus, settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    last = await _orders(bus, 4)
    started = datetime.now(UTC)
    published = await _relay(settings_for_test)
    relayed = datetime.now(UTC)
    assert published == await _events_after(pool, 0) == 6

    behind = await collect_status(settings_for_test, APP, resources)
    for p in behind.projections:
        # Never run: no progress row, so every partition counts from its beginning.
        assert (p.name, p.lag_events, p.position, p.applied) == (p.name, 6, 0, 0)
        assert p.healthy
    _assert_lag_is_age_of(behind, started, relayed)
    assert behind.outbox.unpublished == 0 and behind.outbox.oldest_age_seconds is None

    await _run_daemon(resources)
    caught_up = await collect_status(settings_for_test, APP, resources)
    for p in caught_up.projections:
        assert (p.name, p.position, p.lag_events, p.lag_seconds) == (p.name, last.position, 0, 0)
        assert p.applied > 0 and p.updated_at is not None and p.healthy
        assert sum(part.end_offset for part in p.partitions) == 6
        assert len(p.partitions) == settings_for_test.kafka.partitions
    assert caught_up.healthy


async def test_after_catching_up_only_the_new_events_are_lag(
    bus: CommandBus, settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    applied = await _orders(bus, 3)
    await _relay(settings_for_test)
    await _run_daemon(resources)

    assert applied.position is not None
    await _orders(bus, 5)
    new = await _events_after(pool, applied.position)
    started = datetime.now(UTC)
    await _relay(settings_for_test)
    relayed = datetime.now(UTC)
    status = await collect_status(settings_for_test, APP, resources)
    # Not the age of the events applied before (older than `started`): of the oldest one not.
    _assert_lag_is_age_of(status, started, relayed)
    for p in status.projections:
        assert (p.name, p.lag_events, p.position) == (p.name, new, applied.position)
        lagging = [part for part in p.partitions if part.lag_events]
        assert lagging and all(part.oldest_unapplied_at for part in lagging)
    assert len({tuple(p.partitions) for p in status.projections}) == 1  # one daemon, one pace

    await _orders(bus, 1)  # a customer, a product and an order, not relayed
    still = await collect_status(settings_for_test, APP, resources)
    assert all(p.lag_events == new for p in still.projections)  # not in Kafka yet: not lag
    assert still.outbox.unpublished == 3
    age = still.outbox.oldest_age_seconds
    assert age is not None and 0 <= age <= (still.collected_at - started).total_seconds()


async def test_dead_letters_and_errors_show_until_replayed_and_recovered(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    letters = DeadLetterStore(pool)
    await letters.record([_letter("order_details", 1), _letter("*", 2), _letter("gone", 3)])
    checkpoints = CheckpointStore(pool)
    await checkpoints.failed("order_search", "ConnectionError: the search store is down")

    status = await _status(settings_for_test, resources)
    assert {name: p.dead_letters for name, p in status.items()} == {
        name: 2 if name == "order_details" else 1 for name in status
    }
    search = status["order_search"]
    assert search.error_current and not search.healthy
    assert search.last_error == "ConnectionError: the search store is down"
    assert search.last_error_at is not None and search.updated_at is None  # never finished one
    assert not any(p.error_current for name, p in status.items() if name != "order_search")
    # Nothing was ever published: the topic does not exist, and nothing is behind.
    assert all(p.partitions == [] and p.lag_events == 0 for p in status.values())

    topic = settings_for_test.kafka.topic
    await checkpoints.advance("order_search", [PartitionProgress(topic, 0, 1, 1, None)], 1)
    for letter in await letters.list():
        if letter.projection != "gone":
            await letters.mark_replayed(letter.id)
    recovered = await collect_status(settings_for_test, APP, resources)
    search = next(p for p in recovered.projections if p.name == "order_search")
    assert not search.error_current and search.last_error is not None
    assert search.updated_at is not None and search.position == 1
    assert all(p.dead_letters == 0 for p in recovered.projections)
    assert recovered.healthy


async def test_kafka_unreachable_is_named(
    settings_for_test: Settings, resources: Resources
) -> None:
    down = settings_for_test.model_copy(
        update={
            "kafka": settings_for_test.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
        }
    )
    with pytest.raises(ServiceUnavailableError) as caught:
        await collect_status(down, APP, resources)
    assert caught.value.service == "Kafka"
    assert "127.0.0.1:1" in str(caught.value)


async def test_status_command_prints_json_and_exits_1_when_a_dead_letter_waits(
    bus: CommandBus, settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    await _orders(bus, 2)
    await _relay(settings_for_test)
    env = settings_env(settings_for_test)

    code, out, err = await run_engine("status", "--json", env=env)
    assert code == 0, err
    data = json.loads(out)
    names = [projection.name for projection, _store in APP.projections(resources)]
    assert data["topic"] == settings_for_test.kafka.topic and data["healthy"] is True
    assert {p["name"]: p["lag_events"] for p in data["projections"]} == dict.fromkeys(names, 4)
    assert EngineStatus.model_validate_json(out).projections[0].name == names[0]

    await DeadLetterStore(pool).record([_letter("order_stats", 7)])
    code, out, err = await run_engine("status", env=env)
    assert code == 1, err
    assert all(name in out for name in names) and "outbox: 0 unpublished" in out
    assert "needs attention: order_stats" in err

    code, out, err = await run_engine(
        "status", "--json", env={**env, "ENGINE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    )
    assert code == 4
    assert "Kafka is not reachable at 127.0.0.1:1" in err
