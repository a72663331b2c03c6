"""`engine migrate` and `engine relay` as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from engine import Settings


def _engine(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


@pytest.fixture
def empty_database(stack: Settings) -> Iterator[str]:
    name = f"engine_empty_{uuid.uuid4().hex[:10]}"
    admin = stack.postgres.model_copy(update={"database": "postgres"}).dsn()

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    yield name
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_migrate_creates_the_schema_once(empty_database: str) -> None:
    env = {"ENGINE_POSTGRES__DATABASE": empty_database}
    first = _engine("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "engine-0001-event-log-outbox-commands" in first.stdout
    assert "orders-0001-write-model" in first.stdout
    again = _engine("migrate", env=env)
    assert again.returncode == 0
    assert "up to date" in again.stdout


def test_relay_on_an_unmigrated_database_says_to_migrate(empty_database: str) -> None:
    result = _engine("relay", "--once", env={"ENGINE_POSTGRES__DATABASE": empty_database})
    assert result.returncode == 3
    assert "engine migrate" in result.stderr


def test_an_unknown_application_is_a_configuration_error(empty_database: str) -> None:
    result = _engine(
        "migrate",
        env={"ENGINE_POSTGRES__DATABASE": empty_database, "ENGINE_APP": "nowhere.module:APP"},
    )
    assert result.returncode == 3
    assert "ENGINE_APP" in result.stderr
