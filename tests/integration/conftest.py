"""Fixtures for tests against the real stack: a private database and topic per test run."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from engine import (
    CommandBus,
    KafkaSettings,
    Resources,
    Settings,
    create_pool,
    migrate,
    open_resources,
)
from engine.postgres.roles import grant_read_access
from projections.orders import APP

# Tables a test may fill; emptied before each test that uses the write side.
_TABLES = (
    "order_items, orders, products, customers, engine_outbox, engine_event_log, engine_commands,"
    " engine_projection_versions, engine_dead_letters, engine_projection_checkpoints,"
    " engine_projection_generations, engine_partition_progress, engine_outbox_purged,"
    " engine_parked, engine_lane_states"
)


# Read models are created by the daemon, generation by generation: drop them all.
_DROP_READ_MODELS = r"""
DO $$ DECLARE name text; BEGIN
  FOR name IN SELECT viewname FROM pg_views WHERE schemaname = 'public' LOOP
    EXECUTE format('DROP VIEW IF EXISTS %I CASCADE', name);
  END LOOP;
  FOR name IN SELECT tablename FROM pg_tables WHERE schemaname = 'public'
      AND (tablename ~ '_g[0-9]+$' OR tablename LIKE 'order\_stats\_%') LOOP
    EXECUTE format('DROP TABLE IF EXISTS %I CASCADE', name);
  END LOOP;
END $$
"""


@pytest.fixture(scope="session")
def test_db(stack: Settings) -> Iterator[Settings]:
    """Settings pointing at a fresh database (migrated), dropped after the run."""
    name = f"engine_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = stack.postgres.model_copy(update={"database": "postgres"}).dsn()

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        settings = stack.model_copy(
            update={"postgres": stack.postgres.model_copy(update={"database": name})}
        )
        pool = await create_pool(settings.postgres)
        try:
            await migrate(pool, APP.all_migrations())
            await grant_read_access(
                pool, settings.postgres, settings.read.resolve(settings.postgres)
            )
        finally:
            await pool.close()

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield stack.model_copy(
        update={"postgres": stack.postgres.model_copy(update={"database": name})}
    )
    asyncio.run(drop())


@pytest.fixture(scope="session")
def test_topics(stack: Settings) -> Iterator[list[str]]:
    """The topics named by this run's tests, deleted after the run so that runs do not pile
    them up (a broker with thousands of partitions starts, restarts and rebalances slower)."""
    named: list[str] = []
    yield named

    async def delete() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka.bootstrap_servers)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            if left := sorted(existing.intersection(named)):
                await admin.delete_topics(left)
        finally:
            await admin.close()

    asyncio.run(delete())


@pytest.fixture
def settings_for_test(test_db: Settings, test_topics: list[str]) -> Settings:
    """The test database, plus a Kafka topic, group, Redis prefix and index prefix of its own."""
    tag = uuid.uuid4().hex[:12]
    test_topics.append(f"test.events.{tag}")
    kafka: KafkaSettings = test_db.kafka.model_copy(
        update={"topic": f"test.events.{tag}", "partitions": 3}
    )
    return test_db.model_copy(
        update={
            "kafka": kafka,
            "runner": test_db.runner.model_copy(
                update={"group_id": f"test-{tag}", "max_latency_ms": 50}
            ),
            "redis": test_db.redis.model_copy(update={"key_prefix": f"test:{tag}:"}),
            "elasticsearch": test_db.elasticsearch.model_copy(
                update={"index_prefix": f"test-{tag}"}
            ),
        }
    )


@pytest.fixture
async def pool(settings_for_test: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_for_test.postgres)
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE")
        await conn.execute(_DROP_READ_MODELS)
    yield pool
    await pool.close()


@pytest.fixture
async def resources(settings_for_test: Settings, pool: asyncpg.Pool) -> AsyncIterator[Resources]:
    """Open connections to every store, for this test's names; cleaned up afterwards."""
    async with open_resources(settings_for_test) as opened:
        yield opened
        prefix = settings_for_test.redis.key_prefix
        # A large COUNT: SCAN walks the whole keyspace, ten keys a round trip by default.
        keys = [key async for key in opened.redis.scan_iter(match=f"{prefix}*", count=10_000)]
        if keys:
            await opened.redis.delete(*keys)
        pattern = f"{settings_for_test.elasticsearch.index_prefix}-*"
        indices = await opened.elasticsearch.indices.get(index=pattern, allow_no_indices=True)
        if indices:  # deleting by wildcard is refused (destructive_requires_name)
            await opened.elasticsearch.indices.delete(index=",".join(indices))


@pytest.fixture
def bus(pool: asyncpg.Pool, settings_for_test: Settings) -> CommandBus:
    return CommandBus(pool, APP.handlers, settings_for_test.postgres)
