"""Opening asyncpg pools; their failures are translated by :mod:`engine.drivers`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from engine.drivers import POSTGRES_UNREACHABLE, START_HINT, postgres_address, postgres_errors
from engine.errors import SchemaMissingError, ServiceUnavailableError
from engine.settings import PostgresSettings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# What a handler or store gets: a plain connection or one borrowed from a pool. A
# string alias: it is for annotations only, and asyncpg's classes are not
# subscriptable at run time.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# For the modules that still catch by hand (engine.generations, engine.rebuild,
# engine.status); new code wraps its calls in engine.drivers.postgres_errors.
CONNECTION_ERRORS = POSTGRES_UNREACHABLE


async def create_pool(settings: PostgresSettings) -> asyncpg.Pool:
    """A pool for ``settings``; an unreachable server raises ServiceUnavailableError.

    A refused login passes through as asyncpg raised it: only the caller knows
    which role it asked for and which setting names it.
    """
    with postgres_errors(postgres_address(settings), START_HINT):
        return await asyncpg.create_pool(
            settings.dsn(),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            command_timeout=settings.command_timeout_s,
            timeout=10,
        )


def not_migrated(exc: asyncpg.UndefinedTableError) -> SchemaMissingError:
    """The error for a missing table (for hand-written catches)."""
    return SchemaMissingError(str(exc))


def unavailable(settings: PostgresSettings) -> ServiceUnavailableError:
    """The error for a server at ``settings`` that cannot be reached (for hand-written catches)."""
    return ServiceUnavailableError("PostgreSQL", postgres_address(settings), START_HINT)
