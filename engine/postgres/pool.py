"""Opening asyncpg pools, with connection failures translated at this one boundary."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from engine.errors import ConfigurationError, ServiceUnavailableError
from engine.settings import PostgresSettings, env_var

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# What a handler or store gets: a plain connection or one borrowed from a pool. A
# string alias: it is for annotations only, and asyncpg's classes are not
# subscriptable at run time.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError)


async def create_pool(settings: PostgresSettings) -> asyncpg.Pool:
    """A pool for ``settings``; an unreachable server raises ServiceUnavailableError."""
    try:
        pool = await asyncpg.create_pool(
            settings.dsn(),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            command_timeout=settings.command_timeout_s,
            timeout=10,
        )
    except CONNECTION_ERRORS as exc:
        raise unavailable(settings) from exc
    return pool


def not_migrated(exc: asyncpg.UndefinedTableError) -> ConfigurationError:
    return ConfigurationError(
        f"the database schema is missing ({exc}); create it with: engine migrate"
    )


def unavailable(settings: PostgresSettings) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "PostgreSQL",
        f"{settings.host}:{settings.port} ({env_var('postgres', 'port')})",
        "Start the local stack with: ./dev up",
    )
