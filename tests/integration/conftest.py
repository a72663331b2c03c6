"""Fixtures for tests against the real stack: a private database and topic per test run."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from engine import CommandBus, KafkaSettings, Settings, create_pool, migrate
from projections.orders import APP

# Tables a test may fill; emptied before each test that uses the write side.
_TABLES = (
    "order_items, orders, products, customers, engine_outbox, engine_event_log, engine_commands"
)


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


@pytest.fixture
def settings_for_test(test_db: Settings) -> Settings:
    """The test database, plus a Kafka topic of this test's own."""
    topic = f"test.events.{uuid.uuid4().hex[:12]}"
    kafka: KafkaSettings = test_db.kafka.model_copy(update={"topic": topic, "partitions": 3})
    return test_db.model_copy(update={"kafka": kafka})


@pytest.fixture
async def pool(settings_for_test: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_for_test.postgres)
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE")
    yield pool
    await pool.close()


@pytest.fixture
def bus(pool: asyncpg.Pool, settings_for_test: Settings) -> CommandBus:
    return CommandBus(pool, APP.handlers, settings_for_test.postgres)
