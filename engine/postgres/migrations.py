"""Schema migrations: ordered, named SQL steps, each applied once, in its own transaction.

The engine ships its own (event log, outbox, command log); a domain adds its
write-model tables as further migrations. Concurrent migrators (two processes
starting at once) are serialized by a transaction-level advisory lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

# An arbitrary constant: the advisory-lock key that serializes migrators.
_MIGRATION_LOCK = 0x656E67696E65


@dataclass(frozen=True)
class Migration:
    """One schema step. ``id`` is permanent: never rename or edit an applied migration."""

    id: str
    sql: str


async def migrate(pool: asyncpg.Pool, migrations: Sequence[Migration]) -> list[str]:
    """Apply the migrations not applied yet, in order; returns the ids applied now."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS engine_migrations ("
                " id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for migration in migrations:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                done = await conn.fetchval(
                    "SELECT 1 FROM engine_migrations WHERE id = $1", migration.id
                )
                if done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO engine_migrations (id) VALUES ($1)", migration.id)
                applied_now.append(migration.id)
    return applied_now
