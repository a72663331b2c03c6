"""The query side's read-only role: created and granted by ``engine migrate``.

By default the read model is read from the write side's own database with a
second role that can only SELECT (and whose transactions are read-only), so a
bug or an injection in a query handler cannot change anything. When the read
side points at another server or database (a replica), its grants are managed
there: replicas inherit roles and grants from their primary.
"""

from __future__ import annotations

import logging

import asyncpg

from engine.errors import ConfigurationError
from engine.postgres.pool import Connection
from engine.settings import PostgresSettings, env_var

log = logging.getLogger("engine.migrate")


def same_database(write: PostgresSettings, read: PostgresSettings) -> bool:
    return (write.host, write.port, write.database) == (read.host, read.port, read.database)


async def grant_read_access(
    pool: asyncpg.Pool, write: PostgresSettings, read: PostgresSettings
) -> str:
    """Create (or update) the read role and let it SELECT everything, now and later.

    Returns what was done, for the caller to report.
    """
    if read.user == write.user:
        return f"the read side uses the write role {write.user!r}: no read-only role to grant"
    if not same_database(write, read):
        return "the read side is another database: its grants are managed there"
    reader, secret = read.user, read.password.get_secret_value()
    async with pool.acquire() as conn, conn.transaction():
        # Serialise concurrent migrations (CREATE ROLE has no IF NOT EXISTS).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('engine-read-role'))")
        exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", reader)
        verb = "ALTER" if exists else "CREATE"
        statements = [
            await _format(conn, f"{verb} ROLE %I LOGIN PASSWORD %L", reader, secret),
            await _format(conn, "ALTER ROLE %I SET default_transaction_read_only = on", reader),
            await _format(conn, "GRANT CONNECT ON DATABASE %I TO %I", write.database, reader),
            await _format(conn, "GRANT USAGE ON SCHEMA public TO %I", reader),
            await _format(conn, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I", reader),
            # Views and generation tables the daemon and rebuilds create later.
            await _format(
                conn,
                "ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public"
                " GRANT SELECT ON TABLES TO %I",
                write.user,
                reader,
            ),
        ]
        try:
            for statement in statements:
                await conn.execute(statement)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise ConfigurationError(
                f"the role {write.user!r} may not create or grant the read role {reader!r} "
                f"({exc}); create it yourself with SELECT on the views, or set "
                f"{env_var('read', 'user')} to {write.user!r} to read with the write role"
            ) from exc
    return f"read-only role {reader!r} {'updated' if exists else 'created'} and granted SELECT"


async def _format(conn: Connection, template: str, *args: str) -> str:
    """Quote identifiers and literals server-side (DDL takes no bind parameters)."""
    placeholders = ", ".join(f"${i}::text" for i in range(1, len(args) + 1))
    statement: str = await conn.fetchval(f"SELECT format('{template}', {placeholders})", *args)
    return statement
